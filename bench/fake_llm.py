"""A lean OpenAI-compatible chat-completions server for the bench, run as its own process.

Why not `tests/fakes/openai_server.py`: that one is a Starlette app in a thread of the test process, built to be
scripted. Here the fake must stream to 100 conversations at once without becoming the bottleneck or sharing a
process with the load generator, so it is a bare `asyncio.Protocol` (uvloop when installed) with the C parser
httptools (both come with `uvicorn[standard]`), and each token is a timer callback, not a sleeping coroutine.
The wire format is the same: `data: {chat.completion.chunk}` events, a `finish_reason` chunk, a usage chunk when
`stream_options.include_usage` asks for one, then `data: [DONE]`.

Every answer is scheduled on absolute times: the first token `--ttft-ms` after the request's first byte arrived,
then one token every `--token-ms` after the first was sent, so a late timer never stretches the stream. Timers
never fire early. What was actually sent, and when (on the machine-wide monotonic clock, `time.monotonic()`, which
the load generator reads too), is kept per request and served as JSON at `GET /stats` (`?reset=1` clears it), so
the bench can subtract the LLM's real time to first token, not only the nominal one.

The reply to a request whose last user message carries a key `k<12 hex>` is `Reply <key> w2 w3 ...`
(:func:`reply_tokens`), so the load generator knows every word the server should stream and store.

    python -m bench.fake_llm [--port 0] [--ttft-ms 200] [--tokens 60] [--token-ms 10]

prints one JSON line (`{"port": ..., "pid": ..., "loop": ...}`) once it listens, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import httptools

__all__ = ["KEY_PATTERN", "FakeLLM", "LLMTiming", "main", "reply_text", "reply_tokens"]

KEY_PATTERN: Final = re.compile(r"\bk[0-9a-f]{12}\b")
"""What marks a bench request: the load generator puts one such key in each caller message."""

_EARLY: Final = 0.0002
"""Seconds a timer may fire before its target without being put back to sleep (timers are ms-grained)."""


def reply_tokens(key: str, count: int) -> list[str]:
    """The tokens streamed for a request carrying `key`: `"Reply"`, `" <key>"`, `" w2"`, `" w3"`, ...

    Plain words only, so the server's voice cleaner passes them through unchanged.
    """
    return (["Reply", f" {key}"] + [f" w{index}" for index in range(2, count)])[:count]


def reply_text(key: str, count: int) -> str:
    """The whole reply to a request carrying `key`, as the caller should hear it and the store keep it."""
    return "".join(reply_tokens(key, count))


@dataclass
class LLMTiming:
    """What the fake did for one request, in `time.monotonic()` seconds."""

    key: str
    received: float
    """When the first bytes of the request arrived."""
    first_token: float | None = None
    """When the first content token was written to the socket."""
    last_token: float | None = None
    tokens: int = 0
    aborted: bool = False
    """The client closed the connection before the stream ended."""

    def as_list(self) -> list[Any]:
        """The row `GET /stats` serves: `[key, received, first_token, last_token, tokens, aborted]`."""
        return [self.key, self.received, self.first_token, self.last_token, self.tokens, self.aborted]


class FakeLLM:
    """The server's settings and what it recorded; one instance per process."""

    def __init__(self, *, ttft: float, tokens: int, spacing: float) -> None:
        self.ttft = ttft
        self.tokens = tokens
        self.spacing = spacing
        self.requests = 0
        self.active = 0
        self.timings: list[LLMTiming] = []

    def stats(self, *, reset: bool) -> dict[str, Any]:
        """Counters and per-request timings; with `reset`, forget the timings afterwards."""
        stats: dict[str, Any] = {
            "requests": self.requests,
            "active": self.active,
            "ttft_ms": self.ttft * 1000,
            "tokens": self.tokens,
            "token_ms": self.spacing * 1000,
            "timings": [timing.as_list() for timing in self.timings],
        }
        if reset:
            self.timings = []
        return stats


def _request_key(request: Any) -> str | None:
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            found = KEY_PATTERN.search(content) if isinstance(content, str) else None
            return found.group(0) if found else None
    return None


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return _frame(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _frame(data: bytes) -> bytes:
    """One chunk of a `transfer-encoding: chunked` body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Connection(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, one request at a time (the OpenAI client never pipelines)."""

    def __init__(self, fake: FakeLLM) -> None:
        self._fake = fake
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._now = 0.0
        self._began = 0.0
        self._url = b""
        self._body = bytearray()
        self._queue: deque[tuple[bytes, bytes, bytes, float]] = deque()
        self._timing: LLMTiming | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._tokens: list[str] = []
        self._model = "bench"
        self._usage = False

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._now = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            if self._transport is not None:
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._timing is not None:
            self._timing.aborted = True
            self._timing = None
            self._fake.active -= 1
        self._transport = None

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._began = self._now
        self._url = b""
        self._body = bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self._queue.append((self._parser.get_method(), self._url, bytes(self._body), self._began))
        if self._timing is None:
            self._next()

    # --- Answers ----------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _json(self, status: str, value: Any) -> None:
        body = json.dumps(value, separators=(",", ":")).encode()
        head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        self._write(head.encode() + body)

    def _next(self) -> None:
        while self._queue and self._timing is None:
            method, url, body, began = self._queue.popleft()
            path, _, query = url.partition(b"?")
            if method == b"POST" and path.endswith(b"/chat/completions"):
                self._start(body, began)
            elif method == b"GET" and path == b"/stats":
                self._json("200 OK", self._fake.stats(reset=b"reset=1" in query))
            elif method == b"GET" and path == b"/health":
                self._json("200 OK", {"status": "ok"})
            else:
                self._json("404 Not Found", {"error": {"message": "not found", "type": "invalid_request_error"}})

    def _start(self, body: bytes, began: float) -> None:
        fake = self._fake
        try:
            request: Any = json.loads(body)
        except ValueError:
            self._json("400 Bad Request", {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        fake.requests += 1
        fake.active += 1
        key = _request_key(request) or f"r{fake.requests}"
        self._timing = timing = LLMTiming(key=key, received=began)
        fake.timings.append(timing)
        self._tokens = reply_tokens(key, fake.tokens)
        self._model = str(request.get("model") or "bench")
        options = request.get("stream_options")
        self._usage = isinstance(options, dict) and bool(options.get("include_usage"))
        if not request.get("stream"):
            last = began + fake.ttft + max(len(self._tokens) - 1, 0) * fake.spacing
            self._at(last, self._complete)
            return
        self._write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        self._at(began + fake.ttft, self._token)

    def _at(self, target: float, callback: Callable[[], None]) -> None:
        delay = target - time.monotonic()
        if delay <= _EARLY:
            self._handle = None
            callback()
        else:
            self._handle = self._loop.call_later(delay, self._at, target, callback)

    def _token(self) -> None:
        timing = self._timing
        if timing is None:
            return
        index = timing.tokens
        delta: dict[str, Any] = {"content": self._tokens[index]}
        if index == 0:
            delta["role"] = "assistant"
        data = _chunk(self._model, delta)
        now = time.monotonic()
        self._write(data)
        if timing.first_token is None:
            timing.first_token = now
        timing.last_token = now
        timing.tokens += 1
        if timing.tokens < len(self._tokens):
            self._at(timing.first_token + timing.tokens * self._fake.spacing, self._token)
            return
        tail = _chunk(self._model, {}, finish="stop")
        if self._usage:
            usage = {"prompt_tokens": 10, "completion_tokens": timing.tokens, "total_tokens": 10 + timing.tokens}
            tail += _frame(
                b"data: " + json.dumps({"id": "chatcmpl-bench", "choices": [], "usage": usage}).encode() + b"\n\n"
            )
        tail += _frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self._write(tail)
        self._done()

    def _complete(self) -> None:
        timing = self._timing
        if timing is None:
            return
        timing.first_token = timing.last_token = time.monotonic()
        timing.tokens = len(self._tokens)
        text = "".join(self._tokens)
        self._done()
        self._json(
            "200 OK",
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self._model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": timing.tokens, "total_tokens": 10 + timing.tokens},
            },
        )

    def _done(self) -> None:
        self._timing = None
        self._handle = None
        self._fake.active -= 1
        self._loop.call_soon(self._next)


async def serve(fake: FakeLLM, host: str, port: int) -> None:
    """Listen until SIGTERM or SIGINT, after printing the ready line."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(fake), host, port, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = server.sockets[0].getsockname()[1]
    ready = {"port": bound, "pid": os.getpid(), "loop": type(loop).__module__.split(".")[0]}
    print(json.dumps(ready), flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.fake_llm", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the ready line)")
    parser.add_argument("--ttft-ms", type=float, default=200.0, help="time to first token (default 200)")
    parser.add_argument("--tokens", type=int, default=60, help="tokens per reply (default 60)")
    parser.add_argument("--token-ms", type=float, default=10.0, help="time between tokens (default 10)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio loop")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    fake = FakeLLM(ttft=args.ttft_ms / 1000, tokens=args.tokens, spacing=args.token_ms / 1000)
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:  # uvicorn[standard] brings it on Linux and macOS; plain asyncio works too.
            pass
        else:
            uvloop.run(serve(fake, args.host, args.port))
            return 0
    asyncio.run(serve(fake, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
