"""Uvicorn's httptools protocol with the limits uvicorn does not have: request head size, and read deadlines.

Uvicorn parses requests with httptools (llhttp), which accepts headers of any size, and it waits for a
request's head and body as long as the client likes: a client sending one byte a minute holds its
connection, its request task and the memory of everything it sent, forever. Behind a proxy the proxy
enforces such limits; this server is often run without one (a tunnel, a container port), so it
enforces them itself, per connection, before the app sees anything:

- **Head size**: request line plus headers above `max_head_bytes` gets `431` and the connection closes.
- **Head deadline**: a request's head must be complete `read_timeout` seconds after the connection
  opened (or, on a kept-alive connection, after its first byte); otherwise `408` and close.
- **Body deadline**: once the head is in, the body must be complete within `read_timeout` seconds;
  otherwise `408` if no response was started, and the connection closes either way.

The limits are per process (`configure`, called by `create_app` from the settings), so every worker of
`serve --workers N` applies its own settings. Uvicorn loads this class by its import path (`PROTOCOL`).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Final, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

__all__ = ["PROTOCOL", "GuardedHttpToolsProtocol"]

PROTOCOL: Final = "layercode_agent.server.http:GuardedHttpToolsProtocol"
"""What `serve` passes to uvicorn as `http`."""

_REASONS: Final = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the limit."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with a head size limit and head and body read deadlines (see the module docstring)."""

    max_head_bytes: ClassVar[int] = 16 * 1024
    read_timeout: ClassVar[float] = 10.0

    @classmethod
    def configure(cls, *, max_head_bytes: int, read_timeout: float) -> None:
        """Set this process's limits (from `MAX_HEADER_BYTES` and `REQUEST_READ_TIMEOUT`)."""
        cls.max_head_bytes = max_head_bytes
        cls.read_timeout = read_timeout

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_too_large = False
        self._in_head = False
        self._in_body = False
        self._deadline: asyncio.TimerHandle | None = None

    # --- Deadlines ------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # Uvicorn types `cycle` as always set; it is None until the first request's head is in.
        cycle = cast("RequestResponseCycle | None", self.cycle)
        in_head = self._in_head or cycle is None
        self.logger.warning(
            "closed a connection whose request %s took over %g s", "head" if in_head else "body", self.read_timeout
        )
        if cycle is not None and not in_head:
            cycle.disconnected = True  # The app stops waiting for a body that will not come.
            cycle.message_event.set()
        if in_head or (cycle is not None and not cycle.response_started):
            self._reply_and_close(408, b"request not received in time")
        else:
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """A new connection: its first request head is due within `read_timeout`."""
        super().connection_made(transport)
        self._in_head = True
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: no deadline outlives it."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Bytes in: parse them, starting the head deadline of a kept-alive connection's next request."""
        if self._head_too_large:
            return  # The 431 is out; nothing after it is read.
        if not self._in_head and not self._in_body and self._deadline is None:
            # The first byte of the next request on a kept-alive connection: its head is due from now.
            self._in_head = True
            self._head_bytes = 0
            self._arm()
        super().data_received(data)

    # --- Parser callbacks -------------------------------------------------------------------------

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            self._head_too_large = True
            raise _HeadTooLarge

    def on_url(self, url: bytes) -> None:
        """Parser callback: the request target counts towards the head size."""
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Parser callback: each header counts towards the head size."""
        self._count(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """Parser callback: the head is in; the body is due within `read_timeout`."""
        self._in_head = False
        self._in_body = True
        self._arm()  # The body is due within the same time again.
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """Parser callback: the whole request is in; no deadline until the next one."""
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """Answer a request the parser refused: 431 for a head over the limit, uvicorn's 400 otherwise."""
        if self._head_too_large:
            self.logger.warning("refused a request head over %d bytes", self.max_head_bytes)
            self._reply_and_close(431, f"request head over {self.max_head_bytes} bytes".encode())
        else:
            super().send_400_response(msg)

    def _reply_and_close(self, status: int, message: bytes) -> None:
        self._disarm()
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
        headers = b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(
            message
        )
        self.transport.write(head + headers + message)
        self.transport.close()
