"""The real server on bad input at its HTTP edge: text that is not Unicode, JSON nested too deeply, slow bodies,
an unavailable store, and conversation ids that are awkward in a URL.

Every answer here is produced by the real `layercode-agent serve` (uvicorn, its protocol, the routes, a real SQLite
file or a real `redis-server`), since what matters is the status and the body a caller gets, and what the log keeps.
Bad input gets a 4xx that says what is wrong, never a 5xx or a traceback; the one 5xx, the 503 of a store that is
down, names no internal address.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx
import pytest

from layercode_agent.client import WebhookClient
from layercode_agent.protocol import SIGNATURE_HEADER, sign

from ..fakes.layercode_api import API_KEY, FakeLayercodeAPI
from ..fakes.openai_server import FakeOpenAI
from ..fakes.redis_server import RedisServer
from ..fakes.server_process import ServerProcess, server_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET: Final = "whsec_bad_input"
ADMIN_TOKEN: Final = "admin_bad_input_0123456789"
AUTHORIZE_TOKEN: Final = "tok_bad_input_0123456789"
AGENT: Final = "ag_bad_input"
ADMIN: Final = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STORE_DOWN: Final = "conversation store unavailable"


def _env(fake_llm: FakeOpenAI, tmp_path: Path, *, store_url: str | None = None, **extra: str) -> dict[str, str]:
    env = server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="", store_url=store_url)
    return {**env, "ADMIN_TOKEN": ADMIN_TOKEN, **extra}


def _authorize_env(api: FakeLayercodeAPI, **extra: str) -> dict[str, str]:
    return {"LAYERCODE_API_KEY": API_KEY, "LAYERCODE_API_URL": api.url, "LAYERCODE_AGENT_ID": AGENT, **extra}


def assert_no_traceback(log: str) -> None:
    assert "Traceback" not in log, log
    assert_nothing_unhandled(log)


def assert_nothing_unhandled(log: str) -> None:
    assert "Exception in ASGI application" not in log, log


# --- Text that is not Unicode ----------------------------------------------------------------------------------------


async def test_a_lone_surrogate_anywhere_in_a_signed_body_is_a_400_naming_the_field(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    with ServerProcess(_env(fake_llm, tmp_path), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=30) as http:
            client = WebhookClient(server.url, SECRET, http=http)
            broken = WebhookClient(server.url, SECRET, http=http, conversation_id="lc_conv_\ud800")
            # `WebhookClient.post` writes JSON as ASCII, so each lone surrogate travels as a `\udXXX` escape.
            cases: dict[str, dict[str, Any]] = {
                "turn_id": client.body("message", text="hi", turn_id="turn_\ud800"),
                "text": client.body("message", text="I said \udfff"),
                "metadata.caller.name": client.body("message", text="hi", metadata={"caller": {"name": "\ud83d"}}),
                "interruption_context.text_heard": client.body(
                    "message", text="hi", interruption_context={"text_heard": "\ude00"}
                ),
                "session.start turn_id": client.body("session.start", turn_id="\udbff"),
                "conversation_id": broken.body("data", data={"x": 1}),
                "session.end conversation_id": broken.body("session.end"),
                "transcript[0].text": client.body("session.end", transcript=[{"role": "user", "text": "\ud800!"}]),
                "data.items[1]": client.body("data", data={"items": ["ok", "\udc00"]}),
                "recording_url": client.body("session.update", recording_url="https://x/\ud800"),
            }
            answers = {name: await client.post(body) for name, body in cases.items()}
            listed = await http.get(f"{server.base}/api/conversations", headers=ADMIN)
            after = await client.say("Still there?")
    for name, answer in answers.items():
        field = name.rpartition(" ")[2]
        assert answer.status_code == 400, (name, answer.status_code, answer.text)
        assert answer.json()["error"] == "invalid body"
        assert answer.json()["reason"].startswith(f"{field}: "), (name, answer.json())
        assert "lone surrogate" in answer.json()["reason"]
    assert listed.status_code == 200 and listed.json() == []  # Nothing was stored...
    assert len(fake_llm.received) == 1  # ...and only the good turn after them reached the model.
    assert after.text and after.types[-1] == "response.end"
    assert_no_traceback(server.log)


# --- One body parser for every route that reads a body ---------------------------------------------------------------


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


async def test_json_nested_too_deeply_is_a_400_on_every_route_that_reads_a_body(
    tmp_path: Path, fake_llm: FakeOpenAI, api: FakeLayercodeAPI
) -> None:
    env = _env(fake_llm, tmp_path, PLAYGROUND="true", **_authorize_env(api))
    with ServerProcess(env, cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=30, base_url=server.base) as http:
            answers: list[tuple[str, int, httpx.Response]] = []
            # Too deep for the decoder itself (once a RecursionError, so a 500), and deep enough to be refused.
            for depth in (50_000, 5000, 100):
                message = (
                    f'{{"type":"message","conversation_id":"c_deep","text":"hi","metadata":{{"a":{_deep(depth)}}}}}'
                )
                raw = message.encode()
                json_type = {"content-type": "application/json"}
                webhook = await http.post("/api/agent", content=raw, headers={SIGNATURE_HEADER: sign(raw, SECRET)})
                playground = await http.post("/playground/api/agent", content=raw, headers=json_type)
                authorize = await http.post(
                    "/api/authorize", content=f'{{"metadata":{{"a":{_deep(depth)}}}}}', headers=json_type
                )
                answers += [
                    ("webhook", depth, webhook),
                    ("playground", depth, playground),
                    ("authorize", depth, authorize),
                ]
    for route, depth, answer in answers:
        assert answer.status_code == 400, (route, depth, answer.status_code, answer.text[:200])
        assert answer.json()["error"] == "invalid body", (route, depth)
        assert "nested too deeply" in answer.json()["reason"], (route, depth, answer.json())
    assert api.calls == []
    assert fake_llm.received == []
    assert_no_traceback(server.log)


async def _send_part_of_a_body(port: int, path: str, headers: dict[str, str]) -> bytes:
    """Send a request head announcing 100 body bytes, then only two: what the server answers before it hangs up."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + b"\r\n{" + b'"')
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 60)  # Until the server closes the connection.
    finally:
        writer.close()


async def test_a_slow_body_is_a_408_and_one_log_line_without_a_traceback(
    tmp_path: Path, fake_llm: FakeOpenAI, api: FakeLayercodeAPI
) -> None:
    env = _env(fake_llm, tmp_path, REQUEST_READ_TIMEOUT="1", PLAYGROUND="true", **_authorize_env(api))
    json_type = {"Content-Type": "application/json"}
    # A well-formed, fresh signature header, so the webhook goes on to read the body (which never comes).
    signed = {SIGNATURE_HEADER: f"t={int(time.time())},v1={'0' * 64}", **json_type}
    with ServerProcess(env, cwd=tmp_path) as server:
        answers = await asyncio.gather(
            _send_part_of_a_body(server.port, "/api/agent", signed),
            _send_part_of_a_body(server.port, "/api/authorize", json_type),
            _send_part_of_a_body(server.port, "/playground/api/agent", json_type),
        )
        async with httpx.AsyncClient(timeout=10) as http:
            health = await http.get(f"{server.base}/health")
    log = server.log  # Read after the server stopped: everything it would log about those requests is in.
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert health.status_code == 200
    assert log.count("request body took over 1 s") == 3, log
    assert_no_traceback(log)


# --- A store that is down: a 503 naming no address -------------------------------------------------------------------


async def _every_store_route(
    http: httpx.AsyncClient, server: ServerProcess, client: WebhookClient
) -> dict[str, httpx.Response]:
    """One request to every route that needs the store, as the callers allowed on each would make it."""
    bearer = {"Authorization": f"Bearer {AUTHORIZE_TOKEN}"}
    data = json.dumps(client.body("data", data={"page": "pricing"})).encode()
    return {
        "data": await client.data({"page": "pricing"}),
        "session.end": await client.end(),
        "session.update": await client.post(client.body("session.update", recording_status="completed")),
        "admin list": await http.get(f"{server.base}/api/conversations", headers=ADMIN),
        "admin read": await http.get(f"{server.base}/api/conversations/{client.conversation_id}", headers=ADMIN),
        "admin delete": await http.delete(f"{server.base}/api/conversations/{client.conversation_id}", headers=ADMIN),
        "authorize": await http.post(f"{server.base}/api/authorize", json={}, headers=bearer),
        "playground data": await http.post(
            f"{server.base}/playground/api/agent", content=data, headers={"content-type": "application/json"}
        ),
    }


def assert_503s_name_no_address(answers: dict[str, httpx.Response], *internals: str) -> None:
    for route, answer in answers.items():
        assert answer.status_code == 503, (route, answer.status_code, answer.text)
        assert answer.json()["error"] == STORE_DOWN, (route, answer.json())
        for internal in internals:
            assert internal not in answer.text, (route, answer.text)
            assert internal not in str(answer.headers), (route, answer.headers)


async def _until_the_store_answers(http: httpx.AsyncClient, server: ServerProcess) -> None:
    """Wait (generously) until the server reaches its store again: its client reconnects on its own."""
    deadline = time.monotonic() + 60
    while (await http.get(f"{server.base}/api/conversations", headers=ADMIN)).status_code != 200:
        assert time.monotonic() < deadline, "the store did not come back"
        await asyncio.sleep(0.2)


async def test_with_redis_down_no_answer_names_its_address_and_unknown_callers_get_401(
    tmp_path: Path, fake_llm: FakeOpenAI, api: FakeLayercodeAPI
) -> None:
    with RedisServer() as redis:
        env = _env(
            fake_llm,
            tmp_path,
            store_url=redis.url,
            PLAYGROUND="true",
            **_authorize_env(api, AUTHORIZE_TOKEN=AUTHORIZE_TOKEN, AUTHORIZE_RATE_LIMIT="3/hour"),
        )
        with ServerProcess(env, cwd=tmp_path) as server:
            async with httpx.AsyncClient(timeout=60) as http:
                client = WebhookClient(server.url, SECRET, http=http)
                assert (await client.say("Hello")).text  # The store works...
                redis.stop()  # ...and then it does not.
                answers = await _every_store_route(http, server, client)
                turn = await client.say("Are you there?")
                authorize = f"{server.base}/api/authorize"
                strangers = [
                    await http.post(authorize, json={}),
                    await http.post(authorize, json={}, headers={"Authorization": "Bearer guess"}),
                ]
                redis.start()  # Back on the same port: refused guesses count against the IP again...
                await _until_the_store_answers(http, server)
                guesses = [
                    await http.post(authorize, json={}, headers={"Authorization": f"Bearer guess{index}"})
                    for index in range(4)
                ]
        log = server.log
    address = f"127.0.0.1:{redis.port}"
    assert_503s_name_no_address(answers, address, str(redis.port))
    # A turn still gets its apology and its end, and names nothing either.
    assert turn.status == 200 and turn.types[-1] == "response.end" and address not in turn.body.decode()
    # A caller the gate refuses is told so, whatever the store: the store is not asked first.
    assert [answer.status_code for answer in strangers] == [401, 401], [answer.text for answer in strangers]
    assert all(address not in answer.text for answer in strangers)
    assert [answer.status_code for answer in guesses] == [401, 401, 401, 429]  # ...as SECURITY.md says.
    assert address in log  # The operator finds the detail in the log (with the turn's traceback: not bad input).
    assert_nothing_unhandled(log)


async def test_with_sqlite_locked_no_answer_names_its_path(
    tmp_path: Path, fake_llm: FakeOpenAI, api: FakeLayercodeAPI
) -> None:
    env = _env(fake_llm, tmp_path, PLAYGROUND="true", **_authorize_env(api, AUTHORIZE_TOKEN=AUTHORIZE_TOKEN))
    database = tmp_path / "data" / "conversations.db"
    with ServerProcess(env, cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            client = WebhookClient(server.url, SECRET, http=http)
            assert (await client.say("Hello")).text
            # Another process holds the write lock for longer than the store waits for it.
            locker = sqlite3.connect(database, isolation_level=None)
            try:
                locker.execute("BEGIN EXCLUSIVE")
                answers = await _every_store_route(http, server, client)
                answers.pop("admin list")  # A read: WAL readers are never blocked by a writer.
                answers.pop("admin read")
            finally:
                locker.close()
            after = await client.data({"page": "pricing"}, turn_id="turn_after")
        log = server.log
    assert_503s_name_no_address(answers, str(tmp_path), "conversations.db")
    assert after.status_code == 200  # The lock is gone, and so is the outage.
    assert str(database) in log
    assert_nothing_unhandled(log)


# --- The admin API reaches every id the webhook accepts ----------------------------------------------------------

AWKWARD_IDS: Final = (
    "a/b",
    "../x",
    "..",
    ".",
    "/leading",
    "trailing/",
    "a//b",
    "a%2Fb",
    "100%",
    "with space",
    "q?x=1#frag",
    "ünï/日本語 👋",
)


def _path_of(conversation_id: str) -> str:
    """The id as one URL path segment: every byte outside letters and digits percent-encoded, dots too (a client
    would otherwise resolve `..` itself)."""
    return "/api/conversations/" + quote(conversation_id, safe="").replace(".", "%2E")


async def test_the_admin_api_reads_and_deletes_every_id_the_webhook_accepts(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    with ServerProcess(_env(fake_llm, tmp_path), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=30, base_url=server.base, headers=ADMIN) as http:
            for conversation_id in AWKWARD_IDS:
                turn = await WebhookClient(server.url, SECRET, http=http, conversation_id=conversation_id).say("hi")
                assert turn.text, conversation_id
            listed = {summary["conversation_id"] for summary in (await http.get("/api/conversations")).json()}
            read = {conversation_id: await http.get(_path_of(conversation_id)) for conversation_id in AWKWARD_IDS}
            # A slash need not be encoded: the rest of the path is the id.
            plain = await http.get("/api/conversations/a/b")
            deleted = {conversation_id: await http.delete(_path_of(conversation_id)) for conversation_id in AWKWARD_IDS}
            gone = {conversation_id: await http.get(_path_of(conversation_id)) for conversation_id in AWKWARD_IDS}
            left = (await http.get("/api/conversations")).json()
    assert listed == set(AWKWARD_IDS)
    for conversation_id, answer in read.items():
        assert answer.status_code == 200, (conversation_id, answer.status_code, answer.text)
        assert answer.json()["conversation_id"] == conversation_id
        assert answer.json()["turns"][0]["user_text"] == "hi"
    assert plain.status_code == 200 and plain.json()["conversation_id"] == "a/b"
    assert {conversation_id: answer.status_code for conversation_id, answer in deleted.items()} == dict.fromkeys(
        AWKWARD_IDS, 204
    )
    assert {conversation_id: answer.status_code for conversation_id, answer in gone.items()} == dict.fromkeys(
        AWKWARD_IDS, 404
    )
    assert all(answer.json()["conversation_id"] == conversation_id for conversation_id, answer in gone.items())
    assert left == []
