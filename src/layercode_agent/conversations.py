"""Stored conversations read back as turns, for the `conversations` CLI commands and the admin API.

The turn runner keeps each conversation as a pydantic-ai message log and tags every message with the
Layercode turn it belongs to (ARCHITECTURE.md, "History records"): the caller's words have
`{"turn_id", "role": "user"}`, tool calls and results `{"role": "tool"}`, and the reply
`{"role": "assistant", "status": ...}`, with `text_sent` and `text_heard` when the caller barged in.
A reply still streaming is an empty placeholder with `"status": "pending"`; the greeting has
`"kind": "welcome"`. This module only reads those records, so the CLI and the API show the same turns.

Records are read defensively: older messages without metadata get a role from what they hold, and a
missing key or a status this code does not know means less detail, never an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.usage import RunUsage

from .stores import AgentStore, SessionEventRecord

__all__ = [
    "FINAL_STATUSES",
    "PREVIEW_CHARS",
    "ConversationDetail",
    "ConversationSummary",
    "SessionEventView",
    "ToolUse",
    "TurnView",
    "UsageTotals",
    "delete_conversation",
    "get_conversation",
    "group_turns",
    "list_conversations",
]

FINAL_STATUSES = frozenset({"completed", "interrupted", "failed", "lost"})
"""Reply statuses that end a turn; `"pending"` means a worker is still streaming it."""

PREVIEW_CHARS = 80
"""Longest `last_user_text` in a summary, in characters."""

_Role = Literal["user", "assistant", "tool", "other"]


class ToolUse(BaseModel):
    """One tool call the agent made during a turn, with its result when one was recorded."""

    tool_name: str
    args: str
    """The arguments as compact JSON."""
    result: str | None = None
    """The result as the model saw it, `None` if none was recorded (the turn was cut off first)."""
    outcome: str | None = None
    """pydantic-ai's outcome of the call: `"success"`, `"failed"`, `"retried"`, ..."""


class TurnView(BaseModel):
    """One Layercode turn: what the caller said and what the agent answered."""

    turn_id: str | None
    """Layercode's `turn_id`, `None` for messages stored without one."""
    kind: Literal["message", "welcome", "reply"]
    """`"message"`: the caller spoke; `"welcome"`: the greeting; `"reply"`: agent words with no caller message."""
    user_text: str | None = None
    reply_text: str = ""
    """What the reply holds: the words the caller heard when Layercode reported them, else what was sent."""
    status: str | None = None
    """The reply's status (see `FINAL_STATUSES`, or `"pending"`); `None` if there is no reply or it does not say."""
    text_sent: str | None = None
    """What was streamed, when the caller barged in and Layercode reported what they heard."""
    text_heard: str | None = None
    """What the caller heard of `text_sent`."""
    tools: list[ToolUse] = Field(default_factory=list[ToolUse])
    started_at: datetime | None = None
    ended_at: datetime | None = None
    """When the reply was recorded; `None` while it is pending or if there is none."""


class UsageTotals(BaseModel):
    """LLM usage summed over every run of a conversation."""

    requests: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class SessionEventView(BaseModel):
    """A Layercode session webhook body kept with the conversation (`session.end`, `session.update`)."""

    event_type: str
    session_id: str | None = None
    received_at: datetime
    payload: dict[str, Any]


class ConversationSummary(BaseModel):
    """One line of a conversation list."""

    conversation_id: str
    updated_at: datetime | None = None
    """When messages were last saved; `None` when only session events are stored."""
    turn_count: int = 0
    last_status: str | None = None
    """The status of the last turn's reply."""
    last_user_text: str | None = None
    """The caller's last words, cut to `PREVIEW_CHARS`."""


class ConversationDetail(ConversationSummary):
    """Everything stored about a conversation, turn by turn."""

    turns: list[TurnView] = Field(default_factory=list[TurnView])
    usage: UsageTotals = Field(default_factory=UsageTotals)
    session_events: list[SessionEventView] = Field(default_factory=list[SessionEventView])
    recording_status: str | None = None
    """The latest recording status a session event reported."""
    recording_url: str | None = None
    transcript: list[Any] | None = None
    """Layercode's own transcript from the latest `session.end`, as it sent it."""


async def list_conversations(store: AgentStore, limit: int | None = None) -> list[ConversationSummary]:
    """The stored conversations, most recently saved first.

    Args:
        store: The store to read.
        limit: At most this many; `None` for all.

    Raises:
        StoreError: If the store cannot be read.
    """
    summaries: list[ConversationSummary] = []
    for record in await store.list_conversations(limit=limit):
        conversation = await store.load(record.conversation_id)
        if conversation is None:  # Deleted since it was listed.
            continue
        summaries.append(_summary(record.conversation_id, record.updated_at, group_turns(conversation.messages)))
    return summaries


async def get_conversation(store: AgentStore, conversation_id: str) -> ConversationDetail | None:
    """A conversation's turns, usage and session events, or `None` if the store has neither messages nor events.

    Raises:
        StoreError: If the store cannot be read.
    """
    record = await store.read_record(conversation_id)
    conversation = await store.load(conversation_id) if record is not None else None
    events = await store.session_events(conversation_id)
    if conversation is None and not events:
        return None
    turns = group_turns(conversation.messages) if conversation is not None else []
    summary = _summary(conversation_id, record.updated_at if record is not None else None, turns)
    return ConversationDetail(
        **summary.model_dump(),
        turns=turns,
        usage=_usage(conversation.usage) if conversation is not None else UsageTotals(),
        session_events=[_event_view(event) for event in events],
        recording_status=_latest(events, "recording_status"),
        recording_url=_latest(events, "recording_url"),
        transcript=_transcript(events),
    )


async def delete_conversation(store: AgentStore, conversation_id: str) -> bool:
    """Delete a conversation with its session events; `False` if there was nothing to delete.

    Raises:
        StoreError: If the store cannot be changed.
    """
    exists = await store.read_record(conversation_id) is not None or bool(await store.session_events(conversation_id))
    if exists:
        await store.delete(conversation_id)
    return exists


# --- Grouping messages into turns -----------------------------------------------------------------


@dataclasses.dataclass
class _Turn:
    turn_id: str | None
    kind: Literal["message", "welcome", "reply"]
    user_text: list[str] = dataclasses.field(default_factory=list[str])
    reply: ModelResponse | None = None
    reply_meta: Mapping[str, Any] = dataclasses.field(default_factory=dict[str, Any])
    tools: dict[str, ToolUse] = dataclasses.field(default_factory=dict[str, ToolUse])
    started_at: datetime | None = None

    def view(self) -> TurnView:
        meta = self.reply_meta
        status = _str(meta.get("status"))
        return TurnView(
            turn_id=self.turn_id,
            kind=self.kind,
            user_text="\n".join(self.user_text) if self.kind == "message" else None,
            reply_text=_text(self.reply) if self.reply is not None else "",
            status=status,
            text_sent=_str(meta.get("text_sent")),
            text_heard=_str(meta.get("text_heard")),
            tools=list(self.tools.values()),
            started_at=self.started_at,
            ended_at=self.reply.timestamp if self.reply is not None and status != "pending" else None,
        )


def group_turns(messages: Sequence[ModelMessage]) -> list[TurnView]:
    """Group a conversation's messages into turns.

    A turn starts at each caller message and at each welcome, and collects what follows. A message
    tagged with an earlier turn's `turn_id` (a reply saved after the caller had already spoken
    again) joins that turn; one tagged with a turn seen nowhere else starts a turn of its own.
    """
    turns: list[_Turn] = []
    for message in messages:
        meta = _metadata(message)
        turn_id = _str(meta.get("turn_id"))
        role = _role(message, meta)
        if role == "other":
            continue
        if role == "user":
            turn = _Turn(turn_id, "message")
            turns.append(turn)
        elif meta.get("kind") == "welcome":
            turn = _Turn(turn_id, "welcome")
            turns.append(turn)
        else:
            turn = _owner(turns, turn_id)
        _add(turn, message, meta, role)
    return [turn.view() for turn in turns]


def _owner(turns: list[_Turn], turn_id: str | None) -> _Turn:
    """The turn an agent or tool message belongs to, started if there is none."""
    if turn_id is not None:
        for turn in reversed(turns):
            if turn.turn_id == turn_id:
                return turn
    if turns and (turn_id is None or turns[-1].turn_id is None):
        return turns[-1]
    turn = _Turn(turn_id, "reply")
    turns.append(turn)
    return turn


def _add(turn: _Turn, message: ModelMessage, meta: Mapping[str, Any], role: _Role) -> None:
    if turn.started_at is None:
        turn.started_at = _started_at(message, meta)
    if turn.turn_id is None:
        turn.turn_id = _str(meta.get("turn_id"))
    if isinstance(message, ModelRequest):
        for part in message.parts:
            if isinstance(part, UserPromptPart) and role == "user":
                turn.user_text.append(_prompt_text(part))
            elif isinstance(part, ToolReturnPart):
                call = turn.tools.get(part.tool_call_id)
                if call is None:
                    call = turn.tools[part.tool_call_id] = ToolUse(tool_name=part.tool_name, args="{}")
                call.result = _safe_str(part.model_response_str)
                call.outcome = _str(getattr(part, "outcome", None))
        return
    for part in message.parts:
        if isinstance(part, ToolCallPart):
            turn.tools[part.tool_call_id] = ToolUse(tool_name=part.tool_name, args=_safe_str(part.args_as_json_str))
    if role == "assistant":
        # The last reply wins: a placeholder is followed by the reply that replaced it.
        turn.reply = message
        turn.reply_meta = meta


def _role(message: ModelMessage, meta: Mapping[str, Any]) -> _Role:
    role = meta.get("role")
    if role in ("user", "assistant", "tool"):
        return role
    # No (or an unknown) role: judge by what the message holds, as for messages stored before tagging.
    if isinstance(message, ModelRequest):
        if any(isinstance(part, UserPromptPart) for part in message.parts):
            return "user"
        if any(isinstance(part, ToolReturnPart) for part in message.parts):
            return "tool"
        return "other"
    if any(isinstance(part, ToolCallPart) for part in message.parts):
        return "tool"
    return "assistant"


def _metadata(message: ModelMessage) -> Mapping[str, Any]:
    meta: object = getattr(message, "metadata", None)
    return meta if isinstance(meta, Mapping) else {}


def _started_at(message: ModelMessage, meta: Mapping[str, Any]) -> datetime | None:
    started = meta.get("started_at")
    if isinstance(started, str):
        try:
            return datetime.fromisoformat(started)
        except ValueError:
            pass
    if isinstance(message, ModelResponse):
        return message.timestamp
    if message.timestamp is not None:
        return message.timestamp
    for part in message.parts:
        if isinstance(part, UserPromptPart):
            return part.timestamp
    return None


def _prompt_text(part: UserPromptPart) -> str:
    if isinstance(part.content, str):
        return part.content
    return " ".join(item if isinstance(item, str) else f"[{type(item).__name__}]" for item in part.content)


def _text(message: ModelResponse) -> str:
    return "".join(part.content for part in message.parts if isinstance(part, TextPart))


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _safe_str(render: Callable[[], object]) -> str:
    try:
        return str(render())
    except Exception as exc:  # A malformed stored part must not hide the rest of the conversation.
        return f"<unreadable: {type(exc).__name__}>"


# --- Summaries, usage and session events -----------------------------------------------------------


def _summary(conversation_id: str, updated_at: datetime | None, turns: list[TurnView]) -> ConversationSummary:
    last_user = next((turn.user_text for turn in reversed(turns) if turn.user_text), None)
    return ConversationSummary(
        conversation_id=conversation_id,
        updated_at=updated_at,
        turn_count=len(turns),
        last_status=turns[-1].status if turns else None,
        last_user_text=_preview(last_user) if last_user is not None else None,
    )


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1].rstrip() + "…"


def _usage(usage: RunUsage) -> UsageTotals:
    return UsageTotals(
        requests=usage.requests,
        tool_calls=usage.tool_calls,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
    )


def _event_view(event: SessionEventRecord) -> SessionEventView:
    return SessionEventView(
        event_type=event.event_type,
        session_id=event.session_id,
        received_at=event.received_at,
        payload=event.payload,
    )


def _latest(events: Sequence[SessionEventRecord], key: str) -> str | None:
    # `session.update` reports the recording itself ("completed", "failed"); `session.end` only the
    # organisation's setting ("enabled"), so an update wins whenever there is one.
    for event_type in ("session.update", None):
        for event in reversed(events):
            if event_type is not None and event.event_type != event_type:
                continue
            if isinstance(value := event.payload.get(key), str) and value:
                return value
    return None


def _transcript(events: Sequence[SessionEventRecord]) -> list[Any] | None:
    for event in reversed(events):
        if event.event_type == "session.end" and isinstance(transcript := event.payload.get("transcript"), list):
            return transcript
    return None
