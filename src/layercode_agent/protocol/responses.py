"""Outbound events: what the agent backend streams back to Layercode.

Why strict: these go to Layercode verbatim, so the models forbid unknown fields (a typo must fail here, not be
silently dropped by the platform) and tag each with a ``Literal`` equal to Layercode's own ``type`` string. Every
event carries the ``turn_id`` of the webhook it answers; the docs say it "must be returned in all SSE events".

- ``response.tts``: text to speak; send any number, token-sized deltas are fine.
- ``response.data``: any JSON, forwarded verbatim to the client; also the plain-JSON reply to a ``data`` webhook.
- ``response.end``: the final event of every stream, even a silent one.

Source: docs.layercode.com/api-reference/webhook-sse-api ("Webhook SSE Response Format", pipelines-era and current
pages) and ``@layercode/node-server-sdk`` 1.2.1 ``streamResponse``, summarised in
``/work/shared/layercode-protocol.md`` section 2.2.
"""

from __future__ import annotations

from typing import Any, Literal, assert_never

from pydantic import BaseModel, ConfigDict

__all__ = ["DataResponse", "EndResponse", "OutboundEvent", "TTSResponse", "to_dict"]


class TTSResponse(BaseModel):
    """``response.tts``: text for Layercode to speak."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["response.tts"] = "response.tts"
    content: str
    turn_id: str | None = None


class DataResponse(BaseModel):
    """``response.data``: JSON for the client (UI state); produces no speech."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["response.data"] = "response.data"
    content: Any
    turn_id: str | None = None


class EndResponse(BaseModel):
    """``response.end``: the response is complete; always the last event of a stream."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["response.end"] = "response.end"
    turn_id: str | None = None


OutboundEvent = TTSResponse | DataResponse | EndResponse
"""Every event the backend may send to Layercode."""


def to_dict(event: OutboundEvent) -> dict[str, Any]:
    """Return the wire form of ``event``: keys ``type``, ``content`` (not for ``response.end``), ``turn_id``.

    Built by hand rather than with ``model_dump`` because it runs once per streamed token. ``turn_id`` is always
    present, ``None`` when unknown.

    Args:
        event: The event to convert.

    Returns:
        A new dict in wire key order, ready for ``json.dumps``.
    """
    match event:
        case TTSResponse() | DataResponse():
            return {"type": event.type, "content": event.content, "turn_id": event.turn_id}
        case EndResponse():
            return {"type": event.type, "turn_id": event.turn_id}
        case _:
            assert_never(event)
