"""The load generator: concurrent conversations of signed `message` webhooks, timed as Layercode would hear them.

Why not `layercode_agent.client.WebhookClient`: it is the reference for what is sent (the same body shape, the same
`sign()`, the same `SSEParser` reads the answer), but httpx reads the stream through h11, a pure-Python parser,
and at 100 conversations the load generator must read about 7,500 events a second on one core. So each
conversation speaks HTTP/1.1 over a kept-alive connection from a small pool, with httptools' C parser decoding the
chunked body, and only the `SSEParser` in Python.

Times are `time.monotonic()` seconds, read when the bytes arrive (at the top of `data_received`), on the same
machine-wide clock the fake LLM stamps its requests with: `sent` is taken just before the request is written,
`first_tts` when the bytes holding the first `response.tts` arrive, `ended` when `response.end` does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

from layercode_agent.protocol import SIGNATURE_HEADER, SSEParser, sign

from .fake_llm import reply_text

__all__ = ["ConnectionPool", "Conversation", "LoadTarget", "TurnSample", "run_conversations"]


@dataclass
class TurnSample:
    """One `message` webhook and its streamed answer."""

    turn_id: str
    key: str
    """The `k<12 hex>` key the caller's words carry; the fake LLM's reply and timing are found by it."""
    text: str
    """What the caller said."""
    expected_reply: str
    sent: float = 0.0
    first_tts: float | None = None
    ended: float | None = None
    status: int | None = None
    reply: str = ""
    """Every `response.tts` content, joined."""
    error: str | None = None


@dataclass
class Conversation:
    """One simulated call: its ids and its turns in order."""

    conversation_id: str
    session_id: str
    turns: list[TurnSample] = field(default_factory=list[TurnSample])


@dataclass(frozen=True)
class LoadTarget:
    """Where the webhooks go and how they are signed."""

    host: str
    port: int
    secret: str
    path: str = "/api/agent"
    timeout: float = 60.0
    """Seconds one turn may take before it counts as an error."""


class _Exchange:
    def __init__(self, sample: TurnSample, future: asyncio.Future[None]) -> None:
        self.sample = sample
        self.future = future
        self.parser = SSEParser()
        self.body = bytearray()


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection to the server, one exchange at a time."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._exchange: _Exchange | None = None
        self._now = 0.0
        self.reusable = True
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._transport = None
        self._fail(ConnectionError(f"the server closed the connection ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        self._now = time.monotonic()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, ValueError) as exc:
            self.abort()
            self._fail(ConnectionError(f"unreadable response: {exc}"))

    def send(self, request: bytes, sample: TurnSample) -> asyncio.Future[None]:
        """Write `request` and return a future that resolves when its whole answer has arrived."""
        future: asyncio.Future[None] = self._loop.create_future()
        if self._transport is None:
            future.set_exception(ConnectionError("connection closed"))
            return future
        self._exchange = _Exchange(sample, future)
        sample.sent = time.monotonic()
        self._transport.write(request)
        return future

    def abort(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, exc: Exception) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is not None and not exchange.future.done():
            exchange.future.set_exception(exc)

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        if self._exchange is not None:
            self._exchange.sample.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        sample = exchange.sample
        if sample.status != 200:
            exchange.body += body
            return
        for event in exchange.parser.feed(body):
            kind = event.get("type")
            if kind == "response.tts":
                if sample.first_tts is None:
                    sample.first_tts = self._now
                sample.reply += str(event.get("content", ""))
            elif kind == "response.end":
                sample.ended = self._now

    def on_message_complete(self) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return
        if not self._parser.should_keep_alive():
            self.reusable = False
        if exchange.sample.status != 200:
            exchange.sample.error = (
                f"HTTP {exchange.sample.status}: {bytes(exchange.body[:200]).decode(errors='replace')}"
            )
        if not exchange.future.done():
            exchange.future.set_result(None)


class ConnectionPool:
    """Kept-alive connections, shared by the turns and levels of one server.

    A connection idle for `max_idle` seconds is dropped rather than reused, before uvicorn's 5 s keep-alive
    timeout could close it under a request.
    """

    def __init__(self, target: LoadTarget, max_idle: float = 3.0) -> None:
        self._target = target
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self.opened = 0

    async def acquire(self) -> _Connection:
        """An idle connection, or a new one."""
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable and now - connection.idle_since < self._max_idle:
                return connection
            connection.abort()
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_Connection, self._target.host, self._target.port)
        self.opened += 1
        return connection

    def release(self, connection: _Connection) -> None:
        """Give back a connection whose exchange is over; it is kept if the server keeps it alive."""
        if connection.reusable:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)

    def close(self) -> None:
        """Close every idle connection."""
        for connection in self._idle:
            connection.abort()
        self._idle.clear()


def _request(target: LoadTarget, conversation: Conversation, sample: TurnSample) -> bytes:
    # The body Layercode sends for a `message` (as `WebhookClient.body` builds it), signed over its exact bytes.
    body: dict[str, Any] = {
        "type": "message",
        "session_id": conversation.session_id,
        "conversation_id": conversation.conversation_id,
        "turn_id": sample.turn_id,
        "text": sample.text,
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {target.path} HTTP/1.1\r\nhost: {target.host}:{target.port}\r\ncontent-type: application/json\r\n"
        f"{SIGNATURE_HEADER}: {sign(raw, target.secret)}\r\ncontent-length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


async def _turn(pool: ConnectionPool, target: LoadTarget, conversation: Conversation, sample: TurnSample) -> None:
    request = _request(target, conversation, sample)
    try:
        connection = await pool.acquire()
    except OSError as exc:
        sample.error = f"connect failed: {exc}"
        return
    try:
        await asyncio.wait_for(connection.send(request, sample), target.timeout)
    except TimeoutError:
        connection.abort()
        sample.error = f"no complete answer in {target.timeout:.0f} s"
        return
    except ConnectionError as exc:
        sample.error = str(exc)
        return
    pool.release(connection)
    if sample.error is not None:
        return
    if sample.ended is None:
        sample.error = "the stream ended without response.end"
    elif sample.reply != sample.expected_reply:
        sample.error = f"streamed {sample.reply[:60]!r}, expected {sample.expected_reply[:60]!r}"


async def _conversation(
    pool: ConnectionPool,
    target: LoadTarget,
    conversation: Conversation,
    turns: int,
    tokens: int,
    delay: float,
    think: float,
) -> None:
    await asyncio.sleep(delay)
    for index in range(turns):
        if index and think:
            await asyncio.sleep(think)
        key = f"k{secrets.token_hex(6)}"
        sample = TurnSample(
            turn_id=f"turn_{uuid.uuid4().hex[:12]}",
            key=key,
            text=f"Turn {index + 1}, please answer request {key}.",
            expected_reply=reply_text(key, tokens),
        )
        conversation.turns.append(sample)
        await _turn(pool, target, conversation, sample)


async def run_conversations(
    target: LoadTarget,
    *,
    concurrency: int,
    turns: int,
    tokens: int,
    tag: str,
    ramp: float,
    think: float = 0.0,
    pool: ConnectionPool | None = None,
) -> list[Conversation]:
    """Run `concurrency` conversations of `turns` turns at once; conversation i starts `i * ramp / concurrency` in.

    Spreading the starts over `ramp` seconds (one turn's length by default) lets the calls arrive as independent
    callers would, instead of all 100 webhooks of a round landing in the same millisecond for the whole level.

    Args:
        target: The server.
        concurrency: Conversations in flight.
        turns: Turns per conversation, each sent when the previous answer has ended (plus `think`).
        tokens: Tokens per LLM reply, to know what each reply must be.
        tag: Goes into every conversation id, so runs never share one.
        ramp: Seconds over which the conversations start.
        think: Seconds between a turn's end and the next webhook.
        pool: Connections to reuse; a new pool (closed at the end) when `None`.
    """
    own = pool is None
    pool = pool or ConnectionPool(target)
    conversations = [
        Conversation(conversation_id=f"bench_{tag}_{index}", session_id=f"bench_sess_{tag}_{index}")
        for index in range(concurrency)
    ]
    try:
        await asyncio.gather(
            *(
                _conversation(pool, target, conversation, turns, tokens, index * ramp / concurrency, think)
                for index, conversation in enumerate(conversations)
            )
        )
    finally:
        if own:
            pool.close()
    return conversations
