"""The real server under abuse: forged and oversized requests, slow clients, floods, CORS, a shared rate limit.

Every rule here lives at the HTTP layer, so every test runs the real `layercode-agent serve` (uvicorn, its
protocol, the middleware) and speaks to it over loopback: with httpx where a well-formed client is enough,
and over a raw socket where the client must misbehave (headers too large, bytes trickling in).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from layercode_agent.client import WebhookClient
from layercode_agent.protocol import SIGNATURE_HEADER, SSEParser, sign

from ..fakes.layercode_api import API_KEY, FakeLayercodeAPI
from ..fakes.openai_server import FakeOpenAI, Reply
from ..fakes.server_process import ServerProcess, server_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_abuse"
AGENT = "ag_abuse"
TOKEN = "tok_abuse_0123456789"


def _env(fake_llm: FakeOpenAI, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="")
    return {**env, **extra}


def _stored_rows(tmp_path: Path) -> int:
    """Messages, conversations and session events in the server's SQLite store (markers aside)."""
    path = tmp_path / "data" / "conversations.db"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return sum(db.execute(f"select count(*) from {table}").fetchone()[0] for table in ENTRY_TABLES)


ENTRY_TABLES = ("entries", "records", "session_events")


async def _raw_exchange(port: int, chunks: list[tuple[bytes, float]], *, read_for: float = 30.0) -> tuple[bytes, float]:
    """Send `chunks` (bytes, then a pause) over a raw connection; return what came back and when it was closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()

    async def send() -> None:
        for data, pause in chunks:
            if writer.is_closing() or reader.at_eof():
                return  # The server hung up: a real slow client would notice only now.
            writer.write(data)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)

    sending = asyncio.create_task(send())
    try:
        received = await asyncio.wait_for(reader.read(), read_for)  # Until the server closes the connection.
        return received, time.monotonic() - started
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()


# --- Forged and oversized webhooks ------------------------------------------------------------------


async def test_a_flood_of_forged_webhooks_costs_no_llm_call_and_no_store_write(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    body = json.dumps({"type": "message", "conversation_id": "c_flood", "turn_id": "t1", "text": "hi"}).encode()
    forged = [
        {},
        {SIGNATURE_HEADER: sign(body, "not-the-secret")},
        {SIGNATURE_HEADER: sign(body, SECRET, timestamp=int(time.time()) - 3600)},
        {SIGNATURE_HEADER: "t=1,v1=zz"},
        {SIGNATURE_HEADER: sign(body + b" ", SECRET)},
    ]
    with ServerProcess(_env(fake_llm, tmp_path), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=10) as http:
            answers = await asyncio.gather(
                *(http.post(server.url, content=body, headers=forged[index % len(forged)]) for index in range(100))
            )
            big = await http.post(server.url, content=b"x" * (2 * 1024 * 1024), headers=forged[1])
    assert {answer.status_code for answer in answers} == {401}
    assert all(answer.json()["error"] == "invalid signature" for answer in answers)
    assert big.status_code in (401, 413)
    assert fake_llm.received == []
    assert _stored_rows(tmp_path) == 0


async def test_an_unsigned_webhook_is_refused_before_its_body_is_read(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    # The read deadline is far beyond the wait below: a 401 (rather than a 408, or nothing) can only come
    # from a server that answered without waiting for the body, however busy the machine is.
    with ServerProcess(_env(fake_llm, tmp_path, REQUEST_READ_TIMEOUT="120"), cwd=tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            # Announce a large body and send none of it: the answer must not wait for it.
            writer.write(b"POST /api/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500000\r\n\r\n")
            await writer.drain()
            # The head and the body may come in separate reads: read the head, then the body it announces.
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60.0)
            length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
            assert length is not None, head
            answer = head + await asyncio.wait_for(reader.readexactly(int(length.group(1))), 60.0)
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    assert b"missing layercode-signature header" in answer
    assert fake_llm.received == []


async def test_bodies_over_the_limit_get_413(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    with ServerProcess(_env(fake_llm, tmp_path, MAX_BODY_BYTES="4096"), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=10) as http:
            text = "y" * 5000
            body = json.dumps({"type": "message", "conversation_id": "c_big", "text": text}).encode()
            declared = await http.post(server.url, content=body, headers={SIGNATURE_HEADER: sign(body, SECRET)})

            async def chunks() -> AsyncIterator[bytes]:  # No Content-Length: the limit holds while reading.
                yield body[:3000]
                yield body[3000:]

            chunked = await http.post(
                server.url,
                content=chunks(),
                headers={SIGNATURE_HEADER: sign(body, SECRET)},
            )
            fits = await WebhookClient(server.url, SECRET, http=http).say("short")
    assert declared.status_code == 413
    assert chunked.status_code == 413
    assert fits.text  # A body under the limit is answered as usual.
    assert len(fake_llm.received) == 1


async def test_a_head_over_the_limit_gets_431(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    with ServerProcess(_env(fake_llm, tmp_path, MAX_HEADER_BYTES="2048"), cwd=tmp_path) as server:
        head = (
            f"POST /api/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: {'p' * 4000}\r\nContent-Length: 2\r\n\r\n{{}}"
        )
        answer, _ = await _raw_exchange(server.port, [(head.encode(), 0)])
        small, _ = await _raw_exchange(
            server.port, [(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 0)]
        )
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert b"over 2048 bytes" in answer
    assert small.startswith(b"HTTP/1.1 200 ")


# --- Slow clients -------------------------------------------------------------------------------------


async def test_a_slow_client_cannot_hold_a_connection(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    with ServerProcess(_env(fake_llm, tmp_path, REQUEST_READ_TIMEOUT="1"), cwd=tmp_path) as server:
        # A head that never ends, a body that never comes, and a client that never says anything.
        slow_head = _raw_exchange(server.port, [(b"POST /api/agent HTTP/1.1\r\nHost: 127.0.0.1\r\n", 0)])
        # A well-formed signature header, so the route goes on to read the body (which never comes).
        signed = f"{SIGNATURE_HEADER}: t={int(time.time())},v1={'0' * 64}\r\n".encode()
        slow_body = _raw_exchange(
            server.port,
            [
                (b"POST /api/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n" + signed + b"\r\n{", 0.2),
                (b'"t', 0),
            ],
        )
        silent = _raw_exchange(server.port, [])
        trickle = _raw_exchange(
            server.port, [(b"POST /api/agent HTTP/1.1\r\nHost: 127.0.0.1\r\n", 0.4), *[(b"X-A: b\r\n", 0.4)] * 10]
        )
        results = await asyncio.gather(slow_head, slow_body, silent, trickle)
        # Meanwhile and afterwards, well-behaved callers are answered.
        async with httpx.AsyncClient(timeout=5) as http:
            health = await http.get(f"{server.base}/health")
        log = server.log
    for answer, took in results:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        # Never before the 1 s deadline; the upper bound only says the connection did not stay open for good.
        assert 0.8 < took < 30.0, took
    assert health.status_code == 200
    assert "request head took over 1 s" in log and "request body took over 1 s" in log


def _spoken(stream: bytes) -> str:
    events = SSEParser().feed(stream)
    return "".join(str(event.get("content", "")) for event in events if event.get("type") == "response.tts").strip()


# --- Too many streams for one conversation ------------------------------------------------------------


async def test_one_conversation_cannot_hold_more_than_its_streams(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    fake_llm.default = Reply(tokens=[f" w{index}" for index in range(20)], token_delay=0.1)
    with ServerProcess(_env(fake_llm, tmp_path, MAX_STREAMS_PER_CONVERSATION="2"), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=30) as http:
            client = WebhookClient(server.url, SECRET, http=http)
            body = json.dumps(client.body("message", text="Count slowly.", turn_id="turn_dup")).encode()
            headers = client.signed(body)

            async def deliver() -> tuple[int, str | None, bytes]:
                async with http.stream("POST", server.url, content=body, headers=headers) as response:
                    return response.status_code, response.headers.get("retry-after"), await response.aread()

            # The same delivery three times: the repeats wait for the first reply, holding their streams open.
            first = asyncio.create_task(deliver())
            await asyncio.sleep(0.3)
            second = asyncio.create_task(deliver())
            await asyncio.sleep(0.3)
            third = await deliver()
            answers = [await first, await second]
            other = await WebhookClient(server.url, SECRET, http=http).say("Another conversation is not limited.")
    assert third[0] == 429 and third[1] == "1"
    assert b"MAX_STREAMS_PER_CONVERSATION" in third[2]
    assert [status for status, _, _ in answers] == [200, 200]
    assert (
        _spoken(answers[0][2])
        == _spoken(answers[1][2])
        == "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19"
    )
    assert other.text
    assert len(fake_llm.received) == 2


# --- /api/authorize: CORS and a rate limit shared through Redis ----------------------------------------


async def test_cors_allows_only_the_listed_origins_and_only_on_authorize(
    tmp_path: Path, fake_llm: FakeOpenAI, api: FakeLayercodeAPI
) -> None:
    env = _env(
        fake_llm,
        tmp_path,
        LAYERCODE_API_KEY=API_KEY,
        LAYERCODE_API_URL=api.url,
        LAYERCODE_AGENT_ID=AGENT,
        AUTHORIZE_TOKEN=TOKEN,
        CORS_ALLOW_ORIGINS="https://app.example.com, https://admin.example.com/",
    )
    preflight_headers = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with ServerProcess(env, cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=10, base_url=server.base) as http:
            allowed = await http.options(
                "/api/authorize", headers={"Origin": "https://app.example.com", **preflight_headers}
            )
            refused = await http.options(
                "/api/authorize", headers={"Origin": "https://evil.example", **preflight_headers}
            )
            post = await http.post(
                "/api/authorize",
                json={},
                headers={"Origin": "https://admin.example.com", "Authorization": f"Bearer {TOKEN}"},
            )
            post_evil = await http.post(
                "/api/authorize",
                json={},
                headers={"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"},
            )
            webhook = await http.options(
                "/api/agent", headers={"Origin": "https://app.example.com", **preflight_headers}
            )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in allowed.headers
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert post.status_code == 200 and post.headers["access-control-allow-origin"] == "https://admin.example.com"
    assert "access-control-allow-origin" not in post_evil.headers  # The browser will not let evil.example read it.
    assert "access-control-allow-origin" not in webhook.headers


def test_wildcard_cors_with_credentials_does_not_start(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    env = _env(fake_llm, tmp_path, CORS_ALLOW_ORIGINS="*", CORS_ALLOW_CREDENTIALS="true")
    with pytest.raises(RuntimeError, match="CORS_ALLOW_CREDENTIALS"):
        ServerProcess(env, cwd=tmp_path, startup_timeout=20).start()


async def test_rate_limit_is_shared_by_two_workers_and_a_second_server_over_redis(
    tmp_path: Path, fake_llm: FakeOpenAI, api: FakeLayercodeAPI, redis_url: str
) -> None:
    env = _env(
        fake_llm,
        tmp_path,
        CONVERSATION_STORE=redis_url,
        LAYERCODE_API_KEY=API_KEY,
        LAYERCODE_API_URL=api.url,
        LAYERCODE_AGENT_ID=AGENT,
        AUTHORIZE_TOKEN=TOKEN,
        AUTHORIZE_RATE_LIMIT="6/hour",
    )
    with (
        ServerProcess(env, cwd=tmp_path, args=("--workers", "2")) as two_workers,
        ServerProcess(env, cwd=tmp_path) as other_server,
    ):
        statuses: list[int] = []
        retry_after: list[str] = []
        for index in range(10):
            server = two_workers if index % 2 == 0 else other_server
            # A new connection each time, so the kernel hands them to either worker.
            async with httpx.AsyncClient(timeout=10) as http:
                answer = await http.post(
                    f"{server.base}/api/authorize", json={}, headers={"Authorization": f"Bearer {TOKEN}"}
                )
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                retry_after.append(answer.headers["retry-after"])
    assert statuses == [200] * 6 + [429] * 4
    assert all(500 <= int(value) <= 600 for value in retry_after)  # One every 10 minutes after the burst.
    assert len(api.calls) == 6
