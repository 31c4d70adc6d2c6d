"""`POST /api/agent`: Layercode's webhook.

Verify the signature over the raw bytes first (before parsing, before touching the store), then
answer by event type (docs.layercode.com/api-reference/webhook-sse-api, Oct 2025): `message` and
`session.start` get an SSE stream, `data` a JSON `response.data`, `session.end` / `session.update`
a 200 after storing them, and unknown types a 200 and a log line.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ...protocol import (
    SIGNATURE_HEADER,
    DataEvent,
    EndResponse,
    InboundEvent,
    MessageEvent,
    OutboundEvent,
    SessionEndEvent,
    SessionStartEvent,
    SessionUpdateEvent,
    UnknownEvent,
    check_header,
    encode_json,
    parse_event,
    verify,
)
from ...turns import DeliveryInProgressError, Stage, TurnTiming
from ..deps import RuntimeDep, read_body
from ..runtime import Runtime
from ..sse import EventStream
from ..streams import StreamSlot

__all__ = ["router"]

logger = logging.getLogger("layercode_agent.server")

router = APIRouter()

_JSON = "application/json"


def _counted_stream(events: AsyncIterator[OutboundEvent], runtime: Runtime, slot: StreamSlot) -> EventStream:
    """A reply stream that gives its slot back when it ends, however it ends."""
    return EventStream(events, on_close=partial(runtime.stream_slots.release, slot))


def _too_many_streams(runtime: Runtime, key: str, turn: str) -> StreamSlot | Response:
    """A slot for a reply stream of this turn, or 429 past `MAX_STREAMS_PER_CONVERSATION` (`server/streams.py`).

    Repeated deliveries and new turns are counted apart: a flood of replays never takes the stream the
    caller's next message needs.
    """
    slot = runtime.stream_slots.admit(key, turn, runtime.settings.max_streams_per_conversation)
    if isinstance(slot, StreamSlot):
        return slot
    logger.warning("refused a webhook of conversation %s: %s", key, slot)
    reason = f"{slot} (MAX_STREAMS_PER_CONVERSATION)"
    return JSONResponse({"error": "too many streams", "reason": reason}, status_code=429, headers={"Retry-After": "1"})


def _replay_of_deleted(event: InboundEvent) -> Response:
    """The answer to a replayed webhook of a conversation deleted since: nothing is done, nothing is said."""
    logger.info("answered a replayed webhook of deleted conversation %s without acting", event.conversation_key)
    if isinstance(event, MessageEvent | SessionStartEvent):
        return EventStream(_only_end(event.turn_id))
    return Response(b'{"status":"duplicate"}', media_type=_JSON)


async def _only_end(turn_id: str | None) -> AsyncIterator[OutboundEvent]:
    yield EndResponse(turn_id=turn_id)


def _in_progress(exc: DeliveryInProgressError) -> Response:
    """503 with `Retry-After` for a repeated delivery whose first one a live worker is still handling."""
    logger.warning("a repeated delivery stopped waiting: %s", exc.reason)
    return JSONResponse(
        {"error": "delivery in progress", "reason": exc.reason},
        status_code=503,
        headers={"Retry-After": str(exc.retry_after)},
    )


# The OpenAPI description of this route, for `app.openapi()` (not served in production; the schemathesis tests
# read it). The route reads the raw body itself, since the signature covers its exact bytes, so FastAPI cannot
# infer the body: the events of `protocol/events.py` are written out here. They ignore unknown fields, hence no
# `additionalProperties: false`; `conversation_id` is required as in current payloads (legacy bodies send only
# `session_id`).
_NULLABLE_TEXT = {"type": ["string", "null"]}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_EVENT_FIELDS = {
    "session_id": _NULLABLE_TEXT,
    "conversation_id": {"type": "string", "minLength": 1},
    "turn_id": _NULLABLE_TEXT,
    "custom_metadata": {"type": ["object", "null"]},
    "metadata": {"type": ["object", "null"]},
    "from_phone_number": _NULLABLE_TEXT,
    "to_phone_number": _NULLABLE_TEXT,
}
_EVENT_TYPES = [
    (
        "message",
        {
            "text": {"type": "string"},
            "interruption_context": {
                "type": ["object", "null"],
                "properties": {
                    "previous_turn_interrupted": {"type": "boolean"},
                    "words_heard": {"type": ["integer", "null"]},
                    "text_heard": _NULLABLE_TEXT,
                    "assistant_turn_id": _NULLABLE_TEXT,
                },
            },
        },
        ["text"],
    ),
    ("session.start", {"text": _NULLABLE_TEXT}, []),
    (
        "session.end",
        {
            **{name: _NULLABLE_TEXT for name in ("agent_id", "started_at", "ended_at", "ip_address", "country_code")},
            **{name: _NULLABLE_NUMBER for name in ("duration", "transcription_duration_seconds", "latency")},
            "tts_duration_seconds": _NULLABLE_NUMBER,
            "recording_status": _NULLABLE_TEXT,
            "transcript": {
                "type": ["array", "null"],
                "items": {
                    "type": "object",
                    "properties": {
                        "role": {"type": "string"},
                        "text": {"type": "string"},
                        "timestamp": {"type": ["integer", "number", "string", "null"]},
                    },
                    "required": ["role"],
                },
            },
        },
        [],
    ),
    (
        "session.update",
        {
            "recording_status": _NULLABLE_TEXT,
            "recording_url": _NULLABLE_TEXT,
            "recording_duration": _NULLABLE_NUMBER,
            "error_message": _NULLABLE_TEXT,
        },
        [],
    ),
    ("data", {"data": {}}, []),
]
_NULLABLE_TURN_ID = {"turn_id": _NULLABLE_TEXT}
_TTS_RESPONSE = {
    "type": "object",
    "properties": {"type": {"const": "response.tts"}, "content": {"type": "string"}, **_NULLABLE_TURN_ID},
    "required": ["type", "content", "turn_id"],
    "additionalProperties": False,
}
_DATA_RESPONSE = {
    "type": "object",
    "properties": {"type": {"const": "response.data"}, "content": {}, **_NULLABLE_TURN_ID},
    "required": ["type", "content", "turn_id"],
    "additionalProperties": False,
}
_END_RESPONSE = {
    "type": "object",
    "properties": {"type": {"const": "response.end"}, **_NULLABLE_TURN_ID},
    "required": ["type", "turn_id"],
    "additionalProperties": False,
}
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"oneOf": [_TTS_RESPONSE, _DATA_RESPONSE, _END_RESPONSE]},
        },
    },
    "required": ["data"],
}
_ERROR_BODY = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
            "required": ["error"],
        }
    }
}
_WEBHOOK_OPENAPI = {
    "parameters": [
        {
            "name": SIGNATURE_HEADER,
            "in": "header",
            "required": True,
            "description": "`t=<unix seconds>,v1=<hex HMAC-SHA256 of f'{t}.' + the raw body>`",
            "schema": {"type": "string"},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {
                            "type": "object",
                            "properties": {"type": {"const": tag}, **_EVENT_FIELDS, **fields},
                            "required": ["type", "conversation_id", *required],
                        }
                        for tag, fields, required in _EVENT_TYPES
                    ]
                }
            }
        },
    },
    "responses": {
        "200": {
            "description": "`message`, `session.start`: an SSE stream of response events ending with"
            ' `response.end`; `data`: a `response.data`; other types: `{"status": ...}`. A replay of a webhook'
            " of a conversation deleted since is answered without acting: a stream of only `response.end`, or"
            ' `{"status": "duplicate"}`',
            "content": {
                "text/event-stream": {"schema": _SSE_EVENT},
                "application/json": {
                    "schema": {
                        "oneOf": [
                            _DATA_RESPONSE,
                            {
                                "type": "object",
                                "properties": {"status": {"enum": ["ok", "duplicate", "ignored"]}},
                                "required": ["status"],
                                "additionalProperties": False,
                            },
                        ]
                    }
                },
            },
        },
        "400": {
            "description": "The body is not UTF-8 JSON, not an object, nested over 64 levels deep, or a string in it"
            " holds a lone surrogate (`\\ud800`); `reason` names the field",
            "content": _ERROR_BODY,
        },
        "401": {"description": "The signature is missing, malformed, stale or wrong", "content": _ERROR_BODY},
        "413": {"description": "The body is larger than `MAX_BODY_BYTES`"},
        "422": {"description": "A JSON object that is not a valid event", "content": _ERROR_BODY},
        "429": {"description": "The conversation already has too many reply streams open", "content": _ERROR_BODY},
        "503": {
            "description": "The conversation store is unreachable; or (`data`, `session.end`, `session.update`) the"
            " first delivery of the same body is still being handled by a live worker, with `Retry-After` and"
            ' `{"error": "delivery in progress"}`',
            "content": _ERROR_BODY,
        },
    },
}


@router.post("/api/agent", response_model=None, summary="Answer one Layercode webhook", openapi_extra=_WEBHOOK_OPENAPI)
async def handle_webhook(request: Request, runtime: RuntimeDep) -> Response:
    """Verify, parse and answer one Layercode webhook."""
    timing = TurnTiming()  # Every stage of a turn is timed from here.
    header = request.headers.get(SIGNATURE_HEADER)
    # A request that can never verify (no secret, no header, a malformed or stale one) is refused before its
    # body is read: a flood of them costs no body reads, no parsing, no store, no LLM.
    check_header(header, runtime.secrets)
    body = await read_body(request)
    verify(body, header, runtime.secrets)
    timing.mark(Stage.SIGNATURE_VERIFIED)
    event = parse_event(body)
    # The same body delivered twice (a retry, or a replay within the signature's tolerance) has the
    # same digest: the runner answers it from the first delivery instead of acting again.
    delivery = hashlib.sha256(body).hexdigest()
    runner = runtime.runner
    check = await runner.sessions.check_delivery(event, delivery)
    if check.deleted:
        return _replay_of_deleted(event)
    # A message's likely first LLM request leaves now, before the turn is begun in the store (the turn takes it,
    # or it is closed unanswered): the caller's wait for the model starts as soon as the webhook is known good.
    early = await runner.guess_early(event, check, delivery) if isinstance(event, MessageEvent) else None
    try:
        if isinstance(event, MessageEvent | SessionStartEvent):
            # Streams are counted by the turn they answer, named as the runner names it: a repeat has the same name.
            slot = _too_many_streams(runtime, event.conversation_key, event.turn_id or delivery)
            if not isinstance(slot, StreamSlot):
                return slot
            if isinstance(event, MessageEvent):
                events = runner.stream_message(event, delivery=delivery, timing=timing, early=early)
                early = None  # The turn's now.
            else:
                events = runner.sessions.stream_session_start(event)
            return _counted_stream(events, runtime, slot)
    finally:
        if early is not None:
            early.discard()
    try:
        if isinstance(event, DataEvent):
            reply = await runner.sessions.handle_data(event, delivery=delivery)
            return Response(encode_json(reply), media_type=_JSON)
        if isinstance(event, SessionEndEvent | SessionUpdateEvent):
            recorded = await runner.sessions.record_session_event(event, delivery=delivery)
            return Response(b'{"status":"ok"}' if recorded else b'{"status":"duplicate"}', media_type=_JSON)
    except DeliveryInProgressError as exc:
        return _in_progress(exc)
    assert isinstance(event, UnknownEvent)
    logger.info("acknowledged unknown webhook type %r (conversation %s)", event.type, event.conversation_key)
    return Response(b'{"status":"ignored"}', media_type=_JSON)
