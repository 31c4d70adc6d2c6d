"""Repeated deliveries of `data` and session webhooks, and replays after a conversation was deleted.

A `data`, `session.end` or `session.update` delivery is claimed in the store before it is acted on, so a
retry never runs it twice. These tests run the real `layercode-agent serve` (a slow `DATA_HANDLER` from
tests/fixtures) and check the claim cannot outlive its claimant: a retry after the first worker died is
answered, a retry while it lives waits for its answer, and one that waits too long is told why. Then: a
conversation deleted through the admin API or the CLI stays deleted when its webhooks are replayed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from layercode_agent.client import WebhookClient
from layercode_agent.stores import open_store
from layercode_agent.turns import DELIVERY_TTL, HEARTBEAT_TTL

from ..fakes.history import dialogue, session_events, stored
from ..fakes.openai_server import FakeOpenAI, Received, Reply
from ..fakes.server_process import ServerProcess, server_env, sqlite_url
from .test_integrity import assert_clean_log, deliver, signed_delivery, tts_text, types

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_deliveries"
ADMIN_TOKEN = "adm_deliveries_0123456789"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def deliveries_env(fake_llm: FakeOpenAI, tmp_path: Path, store_url: str, **extra: str) -> dict[str, str]:
    env = server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="", store_url=store_url)
    return {
        **env,
        "DATA_HANDLER": "gated_data_handler:handle",
        "PYTHONPATH": str(FIXTURES),
        "ADMIN_TOKEN": ADMIN_TOKEN,
        **extra,
    }


def store_url_for(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return sqlite_url(tmp_path / "data")
    return str(request.getfixturevalue("redis_url"))  # Only the Redis runs start the redis-server.


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    """The folder the gated data handler records its calls in and waits on."""
    folder = tmp_path / "gate"
    folder.mkdir()
    return folder


def calls(gate: Path) -> list[Path]:
    return sorted(gate.glob("call-*"))


async def wait_for(condition: Callable[[], object], what: str) -> None:
    """Wait for `condition()` to be true, with a deadline generous enough for a busy machine."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def data_response(raw: bytes, content: Any) -> dict[str, Any]:
    """The `response.data` a data webhook with body `raw` is answered with."""
    return {"type": "response.data", "content": content, "turn_id": json.loads(raw)["turn_id"]}


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# --- A claim outlives no claimant ------------------------------------------------------------------------------


async def test_a_data_retry_after_its_worker_was_killed_mid_handler_is_answered(
    tmp_path: Path, fake_llm: FakeOpenAI, gate: Path
) -> None:
    env = deliveries_env(fake_llm, tmp_path, sqlite_url(tmp_path / "data"))
    with ExitStack() as servers:
        doomed = servers.enter_context(ServerProcess(env, cwd=tmp_path))
        # Already running on the same database, so it may still see the dead worker's claim as fresh.
        standby = servers.enter_context(ServerProcess(env, cwd=tmp_path))
        async with httpx.AsyncClient(timeout=120) as http:
            client = WebhookClient(doomed.url, SECRET, http=http)
            raw, headers = signed_delivery(client, client.body("data", data={"gate": str(gate)}))
            first = asyncio.create_task(http.post(doomed.url, content=raw, headers=headers))
            await wait_for(lambda: calls(gate), "the handler to start")
            doomed.kill()  # Mid-handler: its claim is left in the store.
            with pytest.raises(httpx.TransportError):
                await first
            (gate / "release").touch()

            retry = await http.post(standby.url, content=raw, headers=headers)
            again = await http.post(standby.url, content=raw, headers=headers)
        log = standby.log

    assert retry.status_code == 200, retry.text
    assert retry.json() == data_response(raw, {"status": "ok", "seen": {"gate": str(gate)}})
    assert again.status_code == 200 and again.json() == retry.json(), "the retry's answer is the one kept"
    assert len(calls(gate)) == 2, "the killed handler, then the retry's, and no third run"
    assert "store unavailable" not in log
    assert_clean_log(log)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_claim_whose_claimant_has_no_heartbeat_is_taken_over(
    tmp_path: Path, fake_llm: FakeOpenAI, request: pytest.FixtureRequest, backend: str
) -> None:
    # What a worker that died mid-delivery leaves: a claim, kept for a day, by a worker with no heartbeat (or, as
    # earlier versions wrote it, by nobody).
    store_url = store_url_for(backend, tmp_path, request)
    with ServerProcess(deliveries_env(fake_llm, tmp_path, store_url), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=120) as http:
            for claim in ("claimed:ghost-worker", ""):
                client = WebhookClient(server.url, SECRET, http=http)
                data_raw, data_headers = signed_delivery(client, client.body("data", data={"button": "yes"}))
                transcript = [{"role": "user", "text": "Bye.", "timestamp": 1}]
                end_raw, end_headers = signed_delivery(client, client.body("session.end", transcript=transcript))
                async with open_store(store_url) as store:
                    for name in (f"data:{digest(data_raw)}", f"event:{digest(end_raw)}"):
                        assert (
                            await store.set_marker(
                                client.conversation_id, name, claim, ttl=DELIVERY_TTL, only_if_absent=True
                            )
                            is None
                        )

                data = await http.post(server.url, content=data_raw, headers=data_headers)
                end = await http.post(server.url, content=end_raw, headers=end_headers)
                end_again = await http.post(server.url, content=end_raw, headers=end_headers)

                assert data.status_code == 200, (claim, data.text)
                assert data.json() == data_response(data_raw, {"status": "ok", "seen": {"button": "yes"}})
                assert end.status_code == 200 and end.json() == {"status": "ok"}, (claim, end.text)
                assert end_again.status_code == 200 and end_again.json() == {"status": "duplicate"}
                events = await session_events(store_url, client.conversation_id)
                assert [event.event_type for event in events] == ["session.end"], claim
                assert events[0].payload["transcript"] == transcript
        log = server.log
    assert_clean_log(log)


async def test_a_slow_data_handler_keeps_its_claim_while_a_retry_on_another_server_waits(
    tmp_path: Path, fake_llm: FakeOpenAI, gate: Path, redis_url: str
) -> None:
    # The handler outlasts a heartbeat's lifetime several times over: its worker must keep the claim alive,
    # so the retry waits for the answer instead of taking the claim over and running the handler again.
    env = deliveries_env(fake_llm, tmp_path, redis_url)
    with ServerProcess(env, cwd=tmp_path) as a, ServerProcess(env, cwd=tmp_path) as b:
        async with httpx.AsyncClient(timeout=120) as http:
            client = WebhookClient(a.url, SECRET, http=http)
            raw, headers = signed_delivery(client, client.body("data", data={"gate": str(gate)}))
            first = asyncio.create_task(http.post(a.url, content=raw, headers=headers))
            await wait_for(lambda: calls(gate), "the handler to start")
            retry = asyncio.create_task(http.post(b.url, content=raw, headers=headers))
            await asyncio.sleep(2 * HEARTBEAT_TTL)
            assert not first.done() and not retry.done()
            assert len(calls(gate)) == 1, "the retry ran the handler while the first delivery was still handled"
            (gate / "release").touch()
            answers = [await first, await retry]
        logs = a.log + b.log

    expected = data_response(raw, {"status": "ok", "seen": {"gate": str(gate)}})
    assert [answer.status_code for answer in answers] == [200, 200], [answer.text for answer in answers]
    assert [answer.json() for answer in answers] == [expected, expected]
    assert len(calls(gate)) == 1
    assert_clean_log(logs)


async def test_a_retry_that_waited_too_long_is_told_the_first_delivery_is_still_being_handled(
    tmp_path: Path, fake_llm: FakeOpenAI, gate: Path
) -> None:
    # The wait is bounded by LLM_TIMEOUT: the retry gets a 503 that says why, not a false "store unavailable".
    env = deliveries_env(fake_llm, tmp_path, sqlite_url(tmp_path / "data"), LLM_TIMEOUT="1")
    with ServerProcess(env, cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=120) as http:
            client = WebhookClient(server.url, SECRET, http=http)
            raw, headers = signed_delivery(client, client.body("data", data={"gate": str(gate)}))
            first = asyncio.create_task(http.post(server.url, content=raw, headers=headers))
            await wait_for(lambda: calls(gate), "the handler to start")
            retry = await http.post(server.url, content=raw, headers=headers)
            (gate / "release").touch()
            answer = await first
            later = await http.post(server.url, content=raw, headers=headers)
        log = server.log

    assert retry.status_code == 503, retry.text
    assert int(retry.headers["retry-after"]) >= 1
    assert retry.json()["error"] == "delivery in progress"
    assert "still being handled" in retry.json()["reason"]
    assert "store" not in retry.text
    expected = data_response(raw, {"status": "ok", "seen": {"gate": str(gate)}})
    assert answer.status_code == 200 and answer.json() == expected
    assert later.status_code == 200 and later.json() == expected
    assert len(calls(gate)) == 1
    assert "store unavailable" not in log and "conversation store failed" not in log
    assert_clean_log(log)


# --- Deleted stays deleted ---------------------------------------------------------------------------------


async def delete_with_cli(store_url: str, conversation_id: str, cwd: Path) -> None:
    """`layercode-agent conversations delete --yes`, as an operator runs it, on the server's store."""
    env = {
        **{key: value for key, value in os.environ.items() if not key.endswith(("_API_KEY", "_TOKEN"))},
        "CONVERSATION_STORE": store_url,
    }
    command = [sys.executable, "-m", "layercode_agent", "conversations", "delete", "--yes", conversation_id]
    done = await asyncio.to_thread(subprocess.run, command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def answer_by_prompt(received: Received) -> Reply:
    return Reply(
        tokens=["Fresh", " start."] if dialogue(received)[-1][1] == "I am new here." else ["First", " answer."]
    )


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis"])
async def test_a_replay_after_the_conversation_was_deleted_does_not_reopen_it(
    tmp_path: Path, fake_llm: FakeOpenAI, request: pytest.FixtureRequest, backend: str
) -> None:
    fake_llm.responder = answer_by_prompt
    store_url = store_url_for(backend, tmp_path, request)
    env = deliveries_env(fake_llm, tmp_path, store_url)
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with ExitStack() as servers:
        a = servers.enter_context(ServerProcess(env, cwd=tmp_path))
        # The replays reach another server sharing the store, as a load balancer may send them (not in memory).
        b = a if backend == "memory" else servers.enter_context(ServerProcess(env, cwd=tmp_path))
        async with httpx.AsyncClient(timeout=120) as http:
            # The CLI cannot reach another process's memory.
            for deleted_by in ("admin",) if backend == "memory" else ("admin", "cli"):
                client = WebhookClient(a.url, SECRET, http=http)
                conversation = f"{a.base}/api/conversations/{client.conversation_id}"
                message = signed_delivery(client, client.body("message", text="Remember me."))
                data = signed_delivery(client, client.body("data", data={"button": "yes"}))
                end = signed_delivery(client, client.body("session.end", transcript=[]))
                first = await deliver(http, a.url, *message)
                assert (await http.post(a.url, content=data[0], headers=data[1])).status_code == 200
                assert (await http.post(a.url, content=end[0], headers=end[1])).json() == {"status": "ok"}
                assert (await http.get(conversation, headers=admin)).status_code == 200
                llm_requests = len(fake_llm.received)

                if deleted_by == "admin":
                    assert (await http.delete(conversation, headers=admin)).status_code == 204
                else:
                    await delete_with_cli(store_url, client.conversation_id, tmp_path)

                # The same signed bodies again, well within the signature's tolerance.
                replayed = await deliver(http, b.url, *message)
                replayed_data = await http.post(b.url, content=data[0], headers=data[1])
                replayed_end = await http.post(b.url, content=end[0], headers=end[1])
                after_replays = await http.get(conversation, headers=admin)

                assert tts_text(first) == "First answer."
                assert types(replayed) == ["response.end"], (deleted_by, replayed)
                assert replayed_data.status_code == 200 and replayed_data.json() == {"status": "duplicate"}
                assert replayed_end.status_code == 200 and replayed_end.json() == {"status": "duplicate"}
                assert after_replays.status_code == 404, (deleted_by, after_replays.text)
                assert len(fake_llm.received) == llm_requests, f"a replay after the {deleted_by} delete reached the LLM"

                # A genuinely new webhook of the same conversation starts it afresh.
                new = client.body("message", text="I am new here.")
                fresh = await deliver(http, b.url, *signed_delivery(client, new))
                assert tts_text(fresh) == "Fresh start."
                assert len(fake_llm.received) == llm_requests + 1
                if backend != "memory":
                    rows = await stored(store_url, client.conversation_id)
                    assert [row.brief for row in rows] == [
                        ("user", None, "I am new here.", new["turn_id"]),
                        ("assistant", "completed", "Fresh start.", new["turn_id"]),
                    ]
                    assert await session_events(store_url, client.conversation_id) == []
        logs = a.log + (b.log if b is not a else "")
    assert_clean_log(logs)
