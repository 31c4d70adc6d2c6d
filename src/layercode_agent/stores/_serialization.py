"""The JSON forms of records, messages and session events, for backends that store text rather than objects.

A store must give back messages equal (`==`) to the ones it was given, timestamps and tool calls
included, so messages go through the same pydantic settings as pydantic-ai's own
`ModelMessagesTypeAdapter` (bytes as base64). The in-memory store passes session payloads through
the same JSON round trip, so every backend returns the same values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pydantic
from pydantic_ai.conversation_store import ConversationRecord
from pydantic_ai.messages import ModelMessage

_MESSAGE: pydantic.TypeAdapter[ModelMessage] = pydantic.TypeAdapter(
    ModelMessage, config=pydantic.ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
)
_RECORD: pydantic.TypeAdapter[ConversationRecord] = pydantic.TypeAdapter(ConversationRecord)
_PAYLOAD: pydantic.TypeAdapter[dict[str, Any]] = pydantic.TypeAdapter(dict[str, Any])

_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
"""Fixed-width UTC, so timestamps stored as text sort in time order."""


def dump_message(message: ModelMessage) -> str:
    """A message as JSON text."""
    return _MESSAGE.dump_json(message).decode()


def load_message(text: str | bytes) -> ModelMessage:
    """A message back from `dump_message`'s text."""
    return _MESSAGE.validate_json(text)


def dump_record(record: ConversationRecord) -> str:
    """A conversation record as JSON text."""
    return _RECORD.dump_json(record).decode()


def load_record(text: str | bytes) -> ConversationRecord:
    """A conversation record back from `dump_record`'s text."""
    return _RECORD.validate_json(text)


def dump_payload(payload: dict[str, Any]) -> str:
    """A session event body as JSON text."""
    return _PAYLOAD.dump_json(payload).decode()


def load_payload(text: str | bytes) -> dict[str, Any]:
    """A session event body back from `dump_payload`'s text."""
    return _PAYLOAD.validate_json(text)


def format_timestamp(moment: datetime) -> str:
    """`moment` as sortable UTC text; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    """A timezone-aware UTC datetime back from `format_timestamp`'s text."""
    return datetime.strptime(text, _TIMESTAMP_FORMAT).replace(tzinfo=UTC)
