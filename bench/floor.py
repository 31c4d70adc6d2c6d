"""The floor: a framework-free Layercode backend, the least a correct one costs, measured beside the project.

aiohttp's server and client on uvloop (the project's loop), and nothing else: it checks the `layercode-signature`
HMAC (the same algorithm as `layercode_agent.protocol.signature`, written out here so the floor depends on none of
the project's code), parses the `message` webhook, keeps each conversation's history in memory, sends the whole
history to the OpenAI-compatible LLM as a streaming chat completion, writes each text delta as its own
`response.tts` SSE event the moment it arrives, ends with `response.end`, and closes the LLM stream when the caller
hangs up (the handler is cancelled, and with it the LLM request). `GET /history/{conversation_id}` returns what it
kept, so the bench checks the floor's history as it checks the project's.

    FLOOR_WEBHOOK_SECRET=... python -m bench.floor --llm-base-url http://127.0.0.1:PORT/v1 [--port 0]

prints one JSON line (`{"port": ..., "pid": ..., "loop": ...}`) once it listens, and stops on SIGTERM or SIGINT.
The secret comes from the environment so it never shows in a process list.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["main", "verified"]

TOLERANCE = 300
"""Seconds a signature's timestamp may differ from the clock, as the project's default."""
_SYSTEM = {"role": "system", "content": "You are a helpful voice assistant. Answer in short spoken sentences."}
_END_HEAD = b'data: {"type":"response.end","turn_id":'


def verified(body: bytes, header: str | None, secret: bytes, now: float | None = None) -> bool:
    """Whether `header` (`t=<unix seconds>,v1=<hex HMAC-SHA256 of "t." + body>`) signs `body` with `secret`, now."""
    if not header:
        return False
    parts: dict[str, str] = {}
    for part in header.split(","):
        key, _, value = part.partition("=")
        parts[key.strip()] = value.strip()
    ts, signature = parts.get("t", ""), parts.get("v1", "")
    if not ts.isdigit() or not signature or abs((time.time() if now is None else now) - int(ts)) > TOLERANCE:
        return False
    expected = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.lower())


@dataclass
class _History:
    messages: list[dict[str, str]] = field(default_factory=list[dict[str, str]])
    turns: list[dict[str, str | None]] = field(default_factory=list[dict[str, str | None]])


class Floor:
    """The routes, the conversations and the one kept-alive LLM client of one floor process."""

    def __init__(self, llm_base_url: str, secret: str) -> None:
        self.url = llm_base_url.rstrip("/") + "/chat/completions"
        self.secret = secret.encode()
        self.histories: dict[str, _History] = {}
        self.client: aiohttp.ClientSession | None = None

    async def agent(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not verified(body, request.headers.get("layercode-signature"), self.secret):
            return web.Response(status=401, text="bad signature")
        try:
            event: Any = json.loads(body)
            kind, conversation_id = event["type"], str(event["conversation_id"])
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="not a webhook body")
        if kind != "message":
            return web.Response(status=204)
        turn_id, text = event.get("turn_id"), str(event.get("text", ""))
        history = self.histories.setdefault(conversation_id, _History())
        user = {"role": "user", "content": text}
        payload = {"model": "bench", "stream": True, "messages": [_SYSTEM, *history.messages, user]}
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        tail = json.dumps(turn_id).encode() + b"}\n\n"
        sent: list[str] = []
        status = "interrupted"
        assert self.client is not None
        try:
            async with self.client.post(self.url, json=payload) as llm:
                try:
                    if llm.status != 200:
                        raise aiohttp.ClientResponseError(llm.request_info, (), status=llm.status)
                    async for line in llm.content:
                        if not line.startswith(b"data: "):
                            continue
                        data = line[6:].strip()
                        if data == b"[DONE]":
                            break
                        choices = json.loads(data).get("choices")
                        delta = choices[0].get("delta", {}).get("content") if choices else None
                        if delta:
                            sent.append(delta)
                            event_json = json.dumps({"type": "response.tts", "content": delta, "turn_id": turn_id})
                            await response.write(b"data: " + event_json.encode() + b"\n\n")
                except BaseException:
                    llm.close()  # Hung up (cancelled) or failed: drop the LLM's connection, which ends its stream.
                    raise
            status = "completed"
            await response.write(_END_HEAD + tail)
            await response.write_eof()
        except ConnectionResetError:
            raise  # The caller hung up: nothing more to write.
        except aiohttp.ClientError:
            status = "failed"
            await response.write(_END_HEAD + tail)
        finally:
            reply = "".join(sent)
            history.messages += [user, {"role": "assistant", "content": reply}]
            history.turns.append({"turn_id": turn_id, "user_text": text, "reply_text": reply, "status": status})
        return response

    async def history(self, request: web.Request) -> web.Response:
        history = self.histories.get(request.match_info["conversation_id"])
        if history is None:
            return web.json_response({"error": "no such conversation"}, status=404)
        return web.json_response({"turns": history.turns})


async def serve(floor: Floor, host: str, port: int) -> None:
    """Listen until SIGTERM or SIGINT, after printing the ready line."""
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    floor.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
    app = web.Application()
    app.add_routes([web.post("/api/agent", floor.agent), web.get("/history/{conversation_id}", floor.history)])
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = runner.addresses[0][1]
    print(json.dumps({"port": bound, "pid": os.getpid(), "loop": type(loop).__module__.split(".")[0]}), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await floor.client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the ready line)")
    parser.add_argument("--llm-base-url", required=True, help="the OpenAI-compatible base URL, e.g. .../v1")
    args = parser.parse_args(argv)
    secret = os.environ.get("FLOOR_WEBHOOK_SECRET", "")
    if not secret:
        parser.error("set FLOOR_WEBHOOK_SECRET")
    floor = Floor(args.llm_base_url, secret)
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it on Linux and macOS; plain asyncio works too.
        asyncio.run(serve(floor, args.host, args.port))
    else:
        uvloop.run(serve(floor, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
