"""A local OpenAI-compatible chat-completions server that streams like the real one, over loopback.

Tests script what it answers (text tokens and their timing, tool calls whose arguments arrive in
pieces, an HTTP error with its body, a usage chunk, raw SSE bytes, a malformed stream, a hang) and
read back every request it received, so they can check what the LLM was sent and whether the client
hung up before the stream ended.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .net import free_port


@dataclass
class Reply:
    """One scripted answer."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", " there", ",", " how", " can", " I", " help", "?"])
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    tool_call: tuple[str, dict[str, Any]] | None = None
    fail: str | None = None  # "http500", "malformed", "hang", "drop"
    tool_calls: list[tuple[str, dict[str, Any]]] | None = None
    """Several calls in one response, each call's arguments sent `arg_piece` characters at a time."""
    arg_piece: int = 4
    status: int | None = None
    """Answer with this HTTP error status and an OpenAI-style error body instead of a stream."""
    usage: tuple[int, int] | None = None
    """(prompt, completion) tokens, sent in a last chunk without choices when the request asks for usage."""
    finish: str | None = None
    """The finish reason sent instead of `stop` or `tool_calls`."""
    raw: list[bytes] | None = None
    """Send exactly these byte chunks as the stream body (tests of SSE framing)."""


@dataclass
class Received:
    """A request as the fake saw it."""

    body: dict[str, Any]
    at: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens_sent: int = 0
    headers: dict[str, str] = field(default_factory=dict[str, str])
    completed: bool = False
    """The whole stream was sent."""
    hung_up: threading.Event = field(default_factory=threading.Event)
    """Set when the client closed the connection before the stream ended."""
    peer: tuple[str, int] | None = None
    """The client's address and port: the same for requests on one kept-alive connection."""

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))


class FakeOpenAI:
    """Run with `with FakeOpenAI() as fake:` or `FakeOpenAI(responder=...)`; `fake.base_url` is `OPENAI_BASE_URL`."""

    def __init__(self, responder: Callable[[Received], Reply] | None = None) -> None:
        self.replies: list[Reply] = []
        self.default = Reply()
        self.responder = responder
        """Answers requests nothing was scripted for, from what they carry; `default` when unset."""
        self.received: list[Received] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order, then with `responder` or `default`."""
        self.replies.extend(replies)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        peer = (request.client.host, request.client.port) if request.client is not None else None
        received = Received(body=body, at=time.monotonic(), headers=dict(request.headers), peer=peer)
        self.received.append(received)
        if self.replies:
            reply = self.replies.pop(0)
        else:
            reply = self.responder(received) if self.responder is not None else self.default
        if reply.fail == "http500":
            return JSONResponse({"error": {"message": "upstream exploded", "type": "server_error"}}, status_code=500)
        if reply.status is not None:
            error = {"message": f"scripted error {reply.status}", "type": "invalid_request_error", "code": None}
            return JSONResponse({"error": error}, status_code=reply.status)
        if not body.get("stream"):
            text = "".join(reply.tokens)
            return JSONResponse(_completion(body, text))
        return StreamingResponse(self._stream(body, reply, received), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any], reply: Reply, received: Received) -> AsyncIterator[bytes]:
        try:
            async for data in self._events(body, reply, received):
                yield data
            received.completed = True
        finally:
            if not received.completed:
                received.hung_up.set()

    async def _events(self, body: dict[str, Any], reply: Reply, received: Received) -> AsyncIterator[bytes]:
        model = body.get("model", "fake")
        if reply.raw is not None:
            for data in reply.raw:
                yield data
                await asyncio.sleep(reply.token_delay)
            return
        await asyncio.sleep(reply.first_token_delay)
        if reply.fail == "hang":
            await asyncio.sleep(3600)
        if reply.fail == "malformed":
            yield b"data: {this is not json\n\n"
            return
        if reply.tool_call is not None:
            name, args = reply.tool_call
            call = {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)},
            }
            yield _chunk(model, {"role": "assistant", "tool_calls": [call]})
            received.first_token_at = received.last_token_at = time.monotonic()
            yield _chunk(model, {}, finish="tool_calls")
            yield b"data: [DONE]\n\n"
            return
        if reply.tool_calls is not None:
            for index, (name, args) in enumerate(reply.tool_calls):
                text = json.dumps(args)
                start = {"index": index, "id": f"call_{index + 1}", "type": "function"}
                yield _chunk(model, {"role": "assistant", "tool_calls": [{**start, "function": {"name": name}}]})
                for at in range(0, len(text), max(reply.arg_piece, 1)):
                    piece = text[at : at + max(reply.arg_piece, 1)]
                    yield _chunk(model, {"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                    await asyncio.sleep(reply.token_delay)
                received.first_token_at = received.last_token_at = time.monotonic()
            yield _chunk(model, {}, finish=reply.finish or "tool_calls")
            for data in _usage_chunk(body, reply, model):
                yield data
            yield b"data: [DONE]\n\n"
            return
        for index, token in enumerate(reply.tokens):
            if index:
                await asyncio.sleep(reply.token_delay)
            delta: dict[str, Any] = {"content": token}
            if index == 0:
                delta["role"] = "assistant"
            yield _chunk(model, delta)
            received.tokens_sent += 1
            now = time.monotonic()
            if received.first_token_at is None:
                received.first_token_at = now
            received.last_token_at = now
            if reply.fail == "drop" and index == len(reply.tokens) // 2:
                raise ConnectionResetError("fake drops the stream mid-way")
        yield _chunk(model, {}, finish=reply.finish or "stop")
        for data in _usage_chunk(body, reply, model):
            yield data
        yield b"data: [DONE]\n\n"


def _usage_chunk(body: dict[str, Any], reply: Reply, model: str) -> list[bytes]:
    if reply.usage is None or not (body.get("stream_options") or {}).get("include_usage"):
        return []
    prompt, completion = reply.usage
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    payload = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}
    return [b"data: " + json.dumps(payload).encode() + b"\n\n"]


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
