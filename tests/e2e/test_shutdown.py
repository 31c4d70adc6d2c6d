"""SIGTERM with replies streaming: every open stream ends with `response.end`, and nothing new is taken on.

Each test runs the real `layercode-agent serve` (one process, or `--workers 2`) against the OpenAI-compatible fake
made slow, opens real reply streams, sends SIGTERM mid-stream, and checks what the caller received, what the store
kept and how the process ended. No test measures a duration: each waits for a condition, with generous deadlines.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from layercode_agent.client import WebhookClient
from layercode_agent.stores import open_store

from ..fakes.history import stored
from ..fakes.openai_server import FakeOpenAI, Reply
from ..fakes.server_process import ServerProcess, server_env, sqlite_url
from .test_integrity import assert_one_clean_end, tts_text, types

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_shutdown"
EXIT_MARGIN = 60.0
"""Seconds a server may take to exit beyond its drain: an upper bound for a busy machine, not a measurement."""
STARTUP = 180.0
"""Seconds a server may take to answer `/health` (two workers on a busy machine are slow to start)."""

LONG = [f" word{index}" for index in range(3000)]
"""A reply of five minutes at 0.1 s a word: longer than any drain below, and than any test waits."""


def shutdown_env(fake_llm: FakeOpenAI, tmp_path: Path, drain: float) -> tuple[dict[str, str], str]:
    store_url = sqlite_url(tmp_path / "data")
    env = server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="", store_url=store_url)
    return {**env, "SHUTDOWN_DRAIN_SECONDS": str(drain)}, store_url


async def read_reply(client: WebhookClient, body: dict[str, Any], spoken: asyncio.Event) -> list[dict[str, Any]]:
    """Read one reply stream to its end; `spoken` is set once two `response.tts` events arrived."""
    events: list[dict[str, Any]] = []
    # `stream()` is an async generator: closing it closes the HTTP request now, not at garbage collection.
    stream = cast(AsyncGenerator[tuple[float, dict[str, Any]]], client.stream(body))
    async with aclosing(stream) as events_in:
        async for _, event in events_in:
            events.append(event)
            if types(events).count("response.tts") >= 2:
                spoken.set()
    return events


async def reply_begun(client: WebhookClient, body: dict[str, Any]) -> asyncio.Task[list[dict[str, Any]]]:
    """Send `body` and return the task reading its reply, once two `response.tts` events arrived."""
    spoken = asyncio.Event()
    reading = asyncio.create_task(read_reply(client, body, spoken))
    waiting = asyncio.create_task(spoken.wait())
    await asyncio.wait({reading, waiting}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if not spoken.is_set():
        reading.cancel()
        pytest.fail(f"the reply did not begin: {reading.result() if reading.done() else 'nothing for 120 s'}")
    return reading


async def sigterm_mid_reply(
    server: ServerProcess, http: httpx.AsyncClient, text: str
) -> tuple[dict[str, Any], asyncio.Task[list[dict[str, Any]]]]:
    """Say `text` in a new conversation and send SIGTERM once the reply has begun; the task reads the rest."""
    client = WebhookClient(server.url, SECRET, http=http)
    body = client.body("message", text=text)
    reading = await reply_begun(client, body)
    sigterm(server)
    return body, reading


async def assert_kept(store_url: str, body: dict[str, Any], status: str, reply: str) -> None:
    """The conversation of the `message` `body` holds its text and the reply to it, exactly."""
    rows = await stored(store_url, body["conversation_id"])
    assert [row.brief for row in rows] == [
        ("user", None, body["text"], body["turn_id"]),
        ("assistant", status, reply, body["turn_id"]),
    ], body["conversation_id"]


def exit_code(server: ServerProcess, within: float) -> int:
    """SIGTERM's outcome: the exit status once the process ended (it must end within `within` seconds)."""
    assert server.process is not None
    try:
        return server.process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server was still running {within:g} s after SIGTERM:\n{server.log}")


def sigterm(server: ServerProcess) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)


def assert_clean_log(log: str) -> None:
    assert "Traceback" not in log, log
    assert "Task was destroyed" not in log, log
    assert "timeout graceful shutdown exceeded" not in log, log


async def test_a_reply_longer_than_the_drain_ends_with_response_end_and_is_kept_as_sent(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Reply(tokens=LONG, token_delay=0.1))
    env, store_url = shutdown_env(fake_llm, tmp_path, drain=1)
    with ServerProcess(env, cwd=tmp_path, startup_timeout=STARTUP) as server:
        async with httpx.AsyncClient(timeout=120) as http:
            body, reading = await sigterm_mid_reply(server, http, "Tell me a very long story.")
            events = await reading
        code = exit_code(server, 1 + EXIT_MARGIN)
        log = server.log
    assert code == 0, log
    assert_one_clean_end(events)
    sent = tts_text(events)
    assert sent and "word0" in sent
    # The LLM stream was cancelled at the end of the drain, not read to its end.
    assert fake_llm.received[0].tokens_sent < len(LONG)
    await assert_kept(store_url, body, "interrupted", sent)
    assert_clean_log(log)


async def test_a_reply_shorter_than_the_drain_completes_then_the_server_exits(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    tokens = ["Here", *(f" part{index}" for index in range(20)), "."]
    fake_llm.script(Reply(tokens=tokens, token_delay=0.1))
    drain = 120.0
    env, store_url = shutdown_env(fake_llm, tmp_path, drain=drain)
    with ServerProcess(env, cwd=tmp_path, startup_timeout=STARTUP) as server:
        async with httpx.AsyncClient(timeout=120) as http:
            body, reading = await sigterm_mid_reply(server, http, "Tell me a short story.")
            events = await reading
        # Well before the drain's end: the server leaves as soon as its last stream is done.
        code = exit_code(server, drain / 2)
        log = server.log
    assert code == 0, log
    assert_one_clean_end(events)
    assert tts_text(events) == "".join(tokens)
    await assert_kept(store_url, body, "completed", "".join(tokens))
    assert_clean_log(log)


async def test_requests_during_the_drain_get_503_and_a_second_sigterm_ends_it(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Reply(tokens=LONG, token_delay=0.1))
    drain = 300.0
    env, store_url = shutdown_env(fake_llm, tmp_path, drain=drain)
    with ServerProcess(env, cwd=tmp_path, startup_timeout=STARTUP) as server:
        async with httpx.AsyncClient(timeout=120) as http:
            body, reading = await sigterm_mid_reply(server, http, "Tell me a very long story.")

            async with httpx.AsyncClient(timeout=30) as fresh:  # New connections, as new callers open.
                # An unsigned webhook is refused with 401 until the drain begins, then with 503.
                deadline = time.monotonic() + 60
                while (refused := await fresh.post(server.url, content=b"{}")).status_code == 401:
                    assert time.monotonic() < deadline, "the drain never began"
                    await asyncio.sleep(0.05)
                newcomer = WebhookClient(server.url, SECRET, conversation_id="lc_conv_late", http=fresh)
                late = await newcomer.say("Hello?")
                health = await fresh.get(f"{server.base}/health")
                ready = await fresh.get(f"{server.base}/ready")
            assert not reading.done()  # The first reply still streams while the drain refuses the others.
            sigterm(server)  # A second signal ends the drain now.
            events = await reading
        code = exit_code(server, EXIT_MARGIN)
        log = server.log
    for status, headers in (refused.status_code, refused.headers), (late.status, late.headers):
        assert status == 503, (status, log)
        assert int(headers["retry-after"]) >= 1
        assert headers["content-type"].startswith("application/json")
    assert refused.json()["error"] == "shutting down" and refused.json()["reason"]
    assert late.text == "" and b"shutting down" in late.body
    assert health.status_code == 200  # Alive, but not ready: the load balancer sends callers elsewhere.
    assert ready.status_code == 503 and ready.json()["status"] == "draining", ready.text
    assert len(fake_llm.received) == 1  # The refused webhook reached neither the LLM nor the store.
    async with open_store(store_url) as store:
        assert await store.load("lc_conv_late") is None
    assert code == 0, log
    assert_one_clean_end(events)
    await assert_kept(store_url, body, "interrupted", tts_text(events))
    assert_clean_log(log)


async def test_each_of_two_workers_drains_its_own_streams(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    fake_llm.default = Reply(tokens=LONG, token_delay=0.1)
    env, store_url = shutdown_env(fake_llm, tmp_path, drain=1)
    conversations = [f"lc_conv_worker{number}" for number in range(4)]
    with ServerProcess(env, cwd=tmp_path, args=("--workers", "2"), startup_timeout=STARTUP) as server:
        limits = httpx.Limits(max_connections=len(conversations), max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            clients = [WebhookClient(server.url, SECRET, conversation_id=name, http=http) for name in conversations]
            bodies = [client.body("message", text="Tell me a very long story.") for client in clients]
            readers = await asyncio.gather(
                *(reply_begun(client, body) for client, body in zip(clients, bodies, strict=True))
            )
            sigterm(server)  # To the supervisor, which passes it on to each worker.
            answers = await asyncio.gather(*readers)
        code = exit_code(server, 1 + EXIT_MARGIN)
        log = server.log
    assert code == 0, log
    for body, events in zip(bodies, answers, strict=True):
        assert_one_clean_end(events)
        await assert_kept(store_url, body, "interrupted", tts_text(events))
    assert_clean_log(log)
