"""The reply stream of a turn, written straight to the ASGI server: one body chunk per event, as it exists.

Why not Starlette's `StreamingResponse` (or FastAPI's `EventSourceResponse`, which is one): under uvicorn
(ASGI spec 2.3) it opens an anyio task group per response, a second task that waits for the disconnect
and cancel scopes around both, and it ends every stream with an extra empty chunk. Measured with py-spy
under the bench (50 conversations, 60 deltas a turn), the response side was about 6 % of the worker's
CPU: the socket writes 2.3 %, encoding 1.1 %, and the task group, its scopes and the streaming loop most
of the rest. `EventStream` keeps what the stream needs and nothing else:

- the events are read and written in the request's own task, each event one `http.response.body` the
  moment the turn yields it; `response.end` is sent with `more_body=False`, so the chunked stream's
  terminator leaves in the same write as the last event;
- the client going away is noticed by one small task waiting on `receive()` (uvicorn's `send` returns
  quietly once the connection is lost, so without it a turn waiting for its model would never learn):
  on `http.disconnect` it cancels the request's task, which closes the events (the turn stops and keeps
  exactly what was sent) and returns as a finished response would;
- the middleware stack is untouched: every message still goes through `send` as the app's middleware
  wrapped it (the error handlers, the body limit, `DrainingMiddleware`'s count of requests in flight).

It is a `starlette.responses.Response`, so a FastAPI route returns it as any other response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Final

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..protocol import SSE_CONTENT_TYPE, SSE_HEADERS, EndResponse, OutboundEvent, encode

__all__ = ["EventStream"]

_RAW_HEADERS: Final = (
    *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in SSE_HEADERS.items()),
    (b"content-type", f"{SSE_CONTENT_TYPE}; charset=utf-8".encode("latin-1")),
)
"""What Starlette's streaming response sent for the same headers: `SSE_HEADERS` and the media type."""


class EventStream(Response):
    """An SSE reply: `events` framed one by one (`protocol.encode`), ending at `response.end`.

    `on_close` runs exactly once when the stream is over, however it ended: all sent, the client gone,
    the task cancelled or an error raised by the events.
    """

    media_type = SSE_CONTENT_TYPE

    def __init__(self, events: AsyncIterator[OutboundEvent], *, on_close: Callable[[], None] | None = None) -> None:
        """Stream `events` once called; nothing is read from them before."""
        self.status_code = 200
        self.background = None
        self.events = events
        self._on_close = on_close
        self.raw_headers = list(_RAW_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Write the events as they come; stop them at once if the client goes away."""
        task = asyncio.current_task()
        assert task is not None, "an ASGI app runs in a task"
        streaming = True
        gone = False

        def on_disconnect(listener: asyncio.Future[None]) -> None:
            nonlocal gone
            if listener.cancelled() or listener.exception() is not None or not streaming:
                return
            gone = True
            task.cancel()  # Lands in the await the stream is in: the events' `__anext__` or a `send`.

        listener = asyncio.ensure_future(_disconnected(receive))
        listener.add_done_callback(on_disconnect)
        events = self.events
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            ended = False
            async for event in events:
                if ended:
                    continue  # Nothing follows `response.end` on the wire; the events still run to their end.
                ended = isinstance(event, EndResponse)
                await send({"type": "http.response.body", "body": encode(event), "more_body": not ended})
                if ended:
                    streaming = False  # All is said: a client leaving now stops nothing.
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone or task.uncancel() > 0:
                raise  # Cancelled by someone else (the server shutting down): not ours to swallow.
        finally:
            streaming = False
            if not listener.done():
                listener.cancel()
            try:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    # Ends a generator still suspended at a `yield` (a `send` that was cut short): for a turn's
                    # events that stops the turn, as a cancellation inside them does.
                    await aclose()
            finally:
                if self._on_close is not None:
                    on_close, self._on_close = self._on_close, None
                    on_close()


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (or the response is complete: uvicorn then answers `http.disconnect` too)."""
    with suppress(OSError):
        while (await receive())["type"] != "http.disconnect":
            pass
