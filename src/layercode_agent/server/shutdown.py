"""Stopping a worker without cutting a reply: drain, then end every open stream with `response.end`.

Uvicorn, on SIGTERM, closes its listener at once, waits `timeout_graceful_shutdown` for the open
connections and then cancels them: a reply longer than that ends with the connection dropped and no
`response.end`, and the caller hears nothing more. So the app takes the signal first and lets uvicorn
shut down only once every stream has ended properly. The lifespan runs inside uvicorn's signal handling,
in the main thread, so it can take over the handlers uvicorn installed and give them back:

1. **Drain** (`SHUTDOWN_DRAIN_SECONDS`): the listener stays open, but every new request except `/health`,
   `/ready` (503 `draining` by itself) and `/metrics` gets 503 with `Retry-After` and a reason
   (`DrainingMiddleware`, reading `Runtime.draining`); the requests already in (the middleware counts
   them), reply streams above all, go on until they end.
2. **Stop**: the turns still streaming when the drain is over are stopped (`TurnRunner.aclose`): each
   stores exactly the words sent, status `interrupted`, and its stream ends with `response.end`. The
   worker waits (at most `END_GRACE` seconds) until those last events are written; a turn whose
   request was already in when the drain began, but which started only now, is stopped too.
3. **Hand over**: the signal goes on to uvicorn's own handler, which closes the listener and the idle
   connections and runs the rest of the lifespan's shutdown.

SIGINT (Ctrl-C) skips the drain: open streams are stopped at once, as in step 2. A second signal during
the drain ends it now; one more goes straight to uvicorn (a second Ctrl-C there forces the exit). Under
`serve --workers N` the supervisor passes SIGTERM to each worker, and each drains its own streams.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from contextlib import suppress
from types import FrameType
from typing import Any, Final, cast

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .runtime import Runtime

__all__ = ["END_GRACE", "OPEN_WHILE_DRAINING", "DrainingMiddleware", "GracefulShutdown"]

logger = logging.getLogger("layercode_agent.server")

OPEN_WHILE_DRAINING: Final = frozenset({"/health", "/ready", "/metrics"})
"""Routes the drain leaves to themselves: liveness (the process is alive), readiness (which reads
`Runtime.draining` and answers 503 `draining` itself) and the metrics scrape."""
END_GRACE: Final = 5.0
"""Seconds stopped streams get to write their last events before uvicorn takes over."""
RETRY_AFTER: Final = "1"
"""Seconds a refused caller should wait: another worker or instance behind the same address can answer."""
_POLL: Final = 0.05
_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

_Handler = Callable[[int, FrameType | None], Any]


class DrainingMiddleware:
    """503 with `Retry-After` for every new request but `OPEN_WHILE_DRAINING` once the worker drains.

    It also counts the requests it lets in (`Runtime.requests_in_flight`), so the drain knows when they
    are all answered.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request while draining; pass it on, counted, otherwise."""
        if scope["type"] != "http" or scope["path"] in OPEN_WHILE_DRAINING:
            await self.app(scope, receive, send)
            return
        runtime = cast("Runtime | None", getattr(scope["app"].state, "runtime", None))
        if runtime is None:  # Before start-up: nothing to drain yet.
            await self.app(scope, receive, send)
            return
        if runtime.draining:
            refusal = JSONResponse(
                {"error": "shutting down", "reason": "this worker is shutting down and takes no new requests"},
                status_code=503,
                # The connection closes after the answer, so the retry opens a new one (to a live worker).
                headers={"Retry-After": RETRY_AFTER, "Connection": "close"},
            )
            await refusal(scope, receive, send)
            return
        runtime.requests_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            runtime.requests_in_flight -= 1


class GracefulShutdown:
    """Takes SIGTERM and SIGINT from the server, drains this worker's streams, then hands the signal back."""

    def __init__(self, runtime: Runtime, *, drain_seconds: float) -> None:
        self.runtime = runtime
        self.drain_seconds = drain_seconds
        self._previous: dict[int, _Handler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._cut_short = asyncio.Event()
        self._signals = 0

    def install(self) -> bool:
        """Take over the handlers a server (uvicorn) installed for SIGTERM and SIGINT; False if there were none.

        Only in the main thread, and only a handler someone installed: Python's own (SIGINT's
        `KeyboardInterrupt`, SIGTERM's default) is left alone, so an app run in a test is not affected.
        """
        if threading.current_thread() is not threading.main_thread():
            return False
        self._loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            current = signal.getsignal(sig)
            if callable(current) and current is not signal.default_int_handler:
                self._previous[sig] = current
                signal.signal(sig, self._on_signal)
        return bool(self._previous)

    def uninstall(self) -> None:
        """Give each signal back to the handler it had before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    async def aclose(self) -> None:
        """At the end of the lifespan: give the signals back, and stop a drain still running."""
        self.uninstall()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between any two bytecodes, the event loop's included: only hand it to the loop.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._signalled, sig)

    def _signalled(self, sig: int) -> None:
        assert self._loop is not None
        self._signals += 1
        name = signal.Signals(sig).name
        if self._task is None:
            self.runtime.draining = True
            seconds = self.drain_seconds if sig == signal.SIGTERM else 0.0
            self._task = self._loop.create_task(self._shut_down(sig, seconds))
        elif self._signals == 2:
            logger.info("%s again: stopping the reply streams now", name)
            self._cut_short.set()
        else:
            self._hand_over(sig)

    def _open_streams(self) -> int:
        return self.runtime.stream_slots.total()

    async def _shut_down(self, sig: int, seconds: float) -> None:
        name = signal.Signals(sig).name
        runtime = self.runtime
        loop = asyncio.get_running_loop()
        try:
            logger.info(
                "%s: new requests get 503; %d requests in progress (%d reply streams)%s",
                name,
                runtime.requests_in_flight,
                self._open_streams(),
                f", draining for up to {seconds:g} s (SHUTDOWN_DRAIN_SECONDS)" if seconds else "",
            )
            deadline = loop.time() + seconds
            while runtime.requests_in_flight and loop.time() < deadline and not self._cut_short.is_set():
                with suppress(TimeoutError):  # Polls the count; a second signal ends the wait at once.
                    await asyncio.wait_for(self._cut_short.wait(), _POLL)
            if streams := self._open_streams():
                logger.info("stopping %d reply streams still open: each ends with response.end", streams)
            deadline = loop.time() + END_GRACE
            while True:
                # Every turn still running stops, is kept as sent, and ends its stream with `response.end`.
                await runtime.runner.aclose()
                if not runtime.requests_in_flight or loop.time() >= deadline:
                    break
                await asyncio.sleep(_POLL)
            if runtime.requests_in_flight:
                logger.warning(
                    "%d requests (%d reply streams) still open %g s after the turns stopped",
                    runtime.requests_in_flight,
                    self._open_streams(),
                    END_GRACE,
                )
        finally:
            self._hand_over(sig)  # Whatever happened above, uvicorn shuts down.

    def _hand_over(self, sig: int) -> None:
        """Give the signals back and pass this one to the server's handler: uvicorn's own shutdown begins."""
        previous = self._previous.get(sig)
        self.uninstall()
        if previous is not None:
            previous(sig, None)
