"""The Layercode wire layer: webhook bodies in, SSE response events out, and the signature in between.

Why a package of its own: it is the leaf vocabulary every other part of ``layercode_agent`` speaks, so it imports
only the standard library and pydantic, and never the web framework or the agent.

Source: docs.layercode.com/api-reference/webhook-sse-api, summarised in ``/work/shared/layercode-protocol.md``
sections 1 and 2.
"""

from __future__ import annotations

from .bodies import MAX_JSON_DEPTH, load_json_object
from .errors import InvalidPayloadError, LayercodeError, MalformedPayloadError, PayloadError, SignatureError
from .events import (
    DataEvent,
    InboundEvent,
    InterruptionContext,
    MessageEvent,
    SessionEndEvent,
    SessionStartEvent,
    SessionUpdateEvent,
    TranscriptEntry,
    UnknownEvent,
    WebhookEvent,
    parse_event,
)
from .responses import DataResponse, EndResponse, OutboundEvent, TTSResponse, to_dict
from .signature import DEFAULT_TOLERANCE, SIGNATURE_HEADER, check_header, sign, verify
from .sse import SSE_CONTENT_TYPE, SSE_HEADERS, SSEParser, adecode_stream, decode_stream, encode, encode_json

__all__ = [
    "DEFAULT_TOLERANCE",
    "MAX_JSON_DEPTH",
    "SIGNATURE_HEADER",
    "SSE_CONTENT_TYPE",
    "SSE_HEADERS",
    "DataEvent",
    "DataResponse",
    "EndResponse",
    "InboundEvent",
    "InterruptionContext",
    "InvalidPayloadError",
    "LayercodeError",
    "MalformedPayloadError",
    "MessageEvent",
    "OutboundEvent",
    "PayloadError",
    "SSEParser",
    "SessionEndEvent",
    "SessionStartEvent",
    "SessionUpdateEvent",
    "SignatureError",
    "TTSResponse",
    "TranscriptEntry",
    "UnknownEvent",
    "WebhookEvent",
    "adecode_stream",
    "decode_stream",
    "encode",
    "encode_json",
    "load_json_object",
    "parse_event",
    "check_header",
    "sign",
    "to_dict",
    "verify",
]
