r"""Server-Sent Events framing for the webhook response stream, both ways.

Why hand-rolled: Layercode reads exactly ``data: <json>\n\n`` per event, with no ``event:``/``id:`` lines, so
encoding is one ``json.dumps`` per event with no framework in the way (this runs for every streamed token). The
parser is the other side of the same wire, as Layercode would read our stream; the simulator, clients and tests use
it to check what we send.

Headers: the Node SDK sends ``Cache-Control: no-cache, no-transform``, ``Connection: keep-alive`` and
``Content-Encoding: none``; community Python SDKs add ``X-Accel-Buffering: no``. We keep only the cache and
buffering ones: ``Connection`` is forbidden in HTTP/2 and some servers mishandle ``Content-Encoding: none``
(keep compression middleware off the route instead).

Source: docs.layercode.com/api-reference/webhook-sse-api ("Webhook SSE Response Format") and
``@layercode/node-server-sdk`` 1.2.1, summarised in ``/work/shared/layercode-protocol.md`` section 2.1; the
line and field rules follow the WHATWG HTML "Server-sent events" parsing algorithm.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from json.encoder import encode_basestring
from typing import Any, Final

from pydantic import TypeAdapter

from .responses import OutboundEvent, TTSResponse, to_dict

__all__ = [
    "SSE_CONTENT_TYPE",
    "SSE_HEADERS",
    "SSEParser",
    "adecode_stream",
    "decode_stream",
    "encode",
    "encode_json",
]

SSE_CONTENT_TYPE: Final = "text/event-stream"
"""Media type of the webhook response stream."""

SSE_HEADERS: Final[dict[str, str]] = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}
"""Extra response headers that stop caches and proxies (nginx) from buffering or rewriting the stream."""

_ANY: Final = TypeAdapter[Any](Any)
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for ``response.data`` content that is not plain JSON (models, dates, UUIDs...)."""
    return _ANY.dump_python(value, mode="json")


# `json.dumps` with any non-default option builds a new encoder on every call; these are built once.
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_jsonable)
_COMPACT_ASCII: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=_jsonable)


def encode_json(event: OutboundEvent, *, ascii_only: bool = False) -> str:
    r"""Serialise ``event`` as compact JSON, keys in wire order, non-ASCII kept as is.

    Args:
        event: The event to serialise.
        ascii_only: Write every non-ASCII character as a ``\uXXXX`` escape instead.

    Returns:
        The JSON text alone, e.g. ``'{"type":"response.end","turn_id":"turn_1"}'``.
    """
    return (_COMPACT_ASCII if ascii_only else _COMPACT).encode(to_dict(event))


def encode(event: OutboundEvent) -> bytes:
    r"""Frame ``event`` as one SSE event; never fails on the event's text.

    Newlines inside strings are escaped by JSON, so one ``data:`` line always suffices. Text that is not Unicode
    (a lone surrogate, which has no UTF-8 encoding) cannot come from a webhook body, which the parser refuses, but
    could come from a model's output: such an event is written as ASCII JSON, its ``\udXXX`` escapes as any JSON
    reader reads them, rather than breaking the stream before its ``response.end``.

    Args:
        event: The event to frame.

    Returns:
        ``b"data: " + <compact UTF-8 JSON> + b"\n\n"``.
    """
    try:
        if type(event) is TTSResponse:
            # One per streamed token: its two strings escaped by the json module's own C function into a fixed
            # frame, the same bytes as the general path below, in a tenth of its time (0.55 against 5.7 us).
            turn_id = event.turn_id
            return (
                f'data: {{"type":"response.tts","content":{encode_basestring(event.content)},'
                f'"turn_id":{"null" if turn_id is None else encode_basestring(turn_id)}}}\n\n'
            ).encode()
        payload = encode_json(event).encode()
    except UnicodeEncodeError:
        payload = encode_json(event, ascii_only=True).encode()
    return b"data: " + payload + b"\n\n"


class SSEParser:
    r"""Incremental parser turning SSE bytes back into the JSON objects of their ``data`` fields.

    Handles events split anywhere across chunks (even inside a UTF-8 sequence or a ``\r\n``), ``\n``, ``\r\n``
    and ``\r`` line endings, comment lines (``:``), multi-line ``data`` (joined with ``\n``) and ignores other
    fields (``event``, ``id``, ``retry``). An event is dispatched at the blank line that ends it; an unterminated
    event at the end of the stream is dropped, as browsers do.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._skip_lf = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Consume a chunk and return the events it completed.

        Args:
            data: The next bytes of the stream.

        Returns:
            The decoded JSON object of each event completed by this chunk, in order (often empty).

        Raises:
            ValueError: An event's data is not JSON (``json.JSONDecodeError``) or not a JSON object.
        """
        if self._skip_lf and data:
            # The previous chunk ended in "\r": a "\n" starting this one is the rest of that "\r\n".
            self._skip_lf = False
            if data.startswith(b"\n"):
                data = data[1:]
        buffer = self._buffer + data
        events: list[dict[str, Any]] = []
        pos = 0
        while match := _LINE_END.search(buffer, pos):
            self._line(buffer[pos : match.start()].decode(), events)
            pos = match.end()
        self._buffer = buffer[pos:]
        if pos and pos == len(buffer) and buffer.endswith(b"\r"):
            self._skip_lf = True
        return events

    def _line(self, line: str, events: list[dict[str, Any]]) -> None:
        if not line:
            if self._data:
                events.append(_load("\n".join(self._data)))
                self._data = []
            return
        if line.startswith(":"):
            return  # comment, e.g. a keep-alive ping
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))


def _load(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"SSE event data is not a JSON object: {text[:80]!r}")
    return value


def decode_stream(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Parse a whole SSE byte stream, yielding each event's JSON object as soon as it is complete.

    Args:
        chunks: The stream's bytes in any chunking, e.g. ``response.iter_bytes()``.

    Yields:
        Each event's decoded ``data`` object.
    """
    parser = SSEParser()
    for chunk in chunks:
        yield from parser.feed(chunk)


async def adecode_stream(chunks: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Async twin of :func:`decode_stream`, e.g. for ``httpx.Response.aiter_bytes()``.

    Args:
        chunks: The stream's bytes in any chunking.

    Yields:
        Each event's decoded ``data`` object.
    """
    parser = SSEParser()
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event
