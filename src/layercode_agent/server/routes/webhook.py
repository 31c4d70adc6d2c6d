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

from fastapi import APIRouter, Request, Response
from fastapi.responses import EventSourceResponse

from ...protocol import (
    SIGNATURE_HEADER,
    SSE_HEADERS,
    DataEvent,
    MessageEvent,
    OutboundEvent,
    SessionEndEvent,
    SessionStartEvent,
    SessionUpdateEvent,
    UnknownEvent,
    encode,
    encode_json,
    parse_event,
    verify,
)
from ...turns import TurnTiming
from ..deps import RuntimeDep

__all__ = ["router"]

logger = logging.getLogger("layercode_agent.server")

router = APIRouter()

_JSON = "application/json"


async def _encoded(events: AsyncIterator[OutboundEvent]) -> AsyncIterator[bytes]:
    # Each event leaves as its own body chunk the moment it exists: no buffering, no batching.
    async for event in events:
        yield encode(event)


def _stream(events: AsyncIterator[OutboundEvent]) -> EventSourceResponse:
    return EventSourceResponse(_encoded(events), headers=SSE_HEADERS)


@router.post("/api/agent", response_model=None)
async def handle_webhook(request: Request, runtime: RuntimeDep) -> Response:
    """Verify, parse and answer one Layercode webhook."""
    timing = TurnTiming()  # Every stage of a turn is timed from here.
    body = await request.body()
    verify(body, request.headers.get(SIGNATURE_HEADER), runtime.secrets)
    timing.mark("signature_verified")
    event = parse_event(body)
    # The same body delivered twice (a retry, or a replay within the signature's tolerance) has the
    # same digest: the runner answers it from the first delivery instead of acting again.
    delivery = hashlib.sha256(body).hexdigest()
    runner = runtime.runner
    if isinstance(event, MessageEvent):
        return _stream(runner.stream_message(event, delivery=delivery, timing=timing))
    if isinstance(event, SessionStartEvent):
        return _stream(runner.stream_session_start(event))
    if isinstance(event, DataEvent):
        reply = await runner.handle_data(event, delivery=delivery)
        return Response(encode_json(reply), media_type=_JSON)
    if isinstance(event, SessionEndEvent | SessionUpdateEvent):
        recorded = await runner.record_session_event(event, delivery=delivery)
        return Response(b'{"status":"ok"}' if recorded else b'{"status":"duplicate"}', media_type=_JSON)
    assert isinstance(event, UnknownEvent)
    logger.info("acknowledged unknown webhook type %r (conversation %s)", event.type, event.conversation_key)
    return Response(b'{"status":"ignored"}', media_type=_JSON)
