"""A conversation never loses or corrupts a turn: barge-ins, duplicates, racing turns, several workers, crashes.

Every test runs the real `layercode-agent serve` (one process, `--workers 2` on SQLite or Redis, or two servers sharing
Redis) against the OpenAI-compatible fake, speaks to it as Layercode does (signed POSTs, SSE), then
checks two views of the conversation exactly: the stored turn records, and what the LLM was sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from contextlib import ExitStack, aclosing
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from layercode_agent.client import TurnResult, WebhookClient
from layercode_agent.protocol import SSEParser

from ..fakes.history import Row, dialogue, session_events, stored
from ..fakes.openai_server import FakeOpenAI, Received, Reply
from ..fakes.redis_server import RedisServer
from ..fakes.server_process import ServerProcess, server_env, sqlite_url

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_integrity"
MARK = "[interrupted]"


def integrity_env(fake_llm: FakeOpenAI, tmp_path: Path, store_url: str) -> dict[str, str]:
    return server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="", store_url=store_url)


# --- The two views of a conversation ----------------------------------------------------------------


def briefs(rows: list[Row]) -> list[tuple[str | None, str | None, str, str | None]]:
    return [row.brief for row in rows]


def user(text: str, turn_id: str) -> tuple[str, None, str, str]:
    return ("user", None, text, turn_id)


def assistant(status: str, text: str, turn_id: str) -> tuple[str, str, str, str]:
    return ("assistant", status, text, turn_id)


def tts_text(events: list[dict[str, Any]]) -> str:
    return "".join(str(event.get("content", "")) for event in events if event.get("type") == "response.tts")


def types(events: list[dict[str, Any]]) -> list[str]:
    return [str(event.get("type")) for event in events]


def spoken(tokens: list[str]) -> str:
    """The reply as streamed to the caller (the voice cleaner drops the leading space)."""
    return "".join(tokens).strip()


def signed_delivery(client: WebhookClient, body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """One webhook's exact bytes and headers, to deliver them more than once."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    return raw, client.signed(raw)


async def deliver(
    http: httpx.AsyncClient,
    url: str,
    raw: bytes,
    headers: dict[str, str],
    *,
    first_tts: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    """POST exact bytes and headers and read the SSE answer to its end."""
    events: list[dict[str, Any]] = []
    async with http.stream("POST", url, content=raw, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        parser = SSEParser()
        async for chunk in response.aiter_raw():
            for event in parser.feed(chunk):
                events.append(event)
                if first_tts is not None and event.get("type") == "response.tts":
                    first_tts.set()
    return events


def assert_one_clean_end(events: list[dict[str, Any]]) -> None:
    kinds = types(events)
    assert kinds and kinds[-1] == "response.end", kinds
    assert kinds.count("response.end") == 1, kinds


def assert_clean_log(log: str) -> None:
    assert "Traceback" not in log
    assert "Task was destroyed" not in log
    assert "LLM failed" not in log
    assert "could not store" not in log


# --- 1. Barge-in, then the interruption_context that reports it ---------------------------------------


async def test_barge_in_then_interruption_context_keeps_what_the_caller_heard(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    story = [f" word{index}" for index in range(60)]
    fake_llm.script(Reply(tokens=story, token_delay=0.05), Reply(tokens=["Sure,", " go", " ahead."]))
    store_url = sqlite_url(tmp_path / "data")
    with ServerProcess(integrity_env(fake_llm, tmp_path, store_url), cwd=tmp_path) as server:
        async with WebhookClient(server.url, SECRET) as client:
            first = client.body("message", text="Tell me a long story.")
            streamed: list[str] = []
            # `stream()` is an async generator: closing it closes the HTTP request now, not at garbage collection.
            stream = cast(AsyncGenerator[tuple[float, dict[str, Any]]], client.stream(first))
            async with aclosing(stream) as events:
                async for _, event in events:
                    if event["type"] == "response.tts":
                        streamed.append(str(event["content"]))
                    if len(streamed) == 4:
                        break  # The caller barges in: Layercode aborts the request.
            heard = " ".join("".join(streamed).split()[:2])
            second = client.body(
                "message",
                text="Wait, stop.",
                interruption_context={
                    "previous_turn_interrupted": True,
                    "words_heard": 2,
                    "text_heard": heard,
                    "assistant_turn_id": first["turn_id"],
                },
            )
            answer = await client.turn(second)
        log = server.log
    assert answer.status == 200
    assert answer.text == "Sure, go ahead."
    assert_one_clean_end(answer.events)
    assert heard == "word0 word1"

    # The LLM stream of the aborted turn was cancelled, not drained.
    assert len(fake_llm.received) == 2
    assert fake_llm.received[0].tokens_sent < 30, fake_llm.received[0].tokens_sent
    # The model sees exactly what the caller heard, marked as cut off, between the two user turns.
    assert dialogue(fake_llm.received[1]) == [
        ("user", "Tell me a long story."),
        ("assistant", f"{heard} {MARK}"),
        ("user", "Wait, stop."),
    ]

    rows = await stored(store_url, client.conversation_id)
    assert briefs(rows) == [
        user("Tell me a long story.", first["turn_id"]),
        assistant("interrupted", heard, first["turn_id"]),
        user("Wait, stop.", second["turn_id"]),
        assistant("completed", "Sure, go ahead.", second["turn_id"]),
    ]
    interrupted = rows[1].meta
    assert interrupted["text_heard"] == heard
    text_sent = interrupted["text_sent"]
    assert text_sent.startswith("".join(streamed)), (text_sent, streamed)
    assert spoken(story).startswith(text_sent) and len(text_sent) < len(spoken(story))
    assert_clean_log(log)


# --- 2. The same delivery twice -----------------------------------------------------------------------


async def test_duplicate_deliveries_are_answered_from_the_first(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    quick = ["Hello", " there,", " friend."]
    slow = ["Slowly", *(f" slow{index}" for index in range(12))]
    fake_llm.script(Reply(tokens=quick), Reply(tokens=slow, token_delay=0.1))
    store_url = sqlite_url(tmp_path / "data")
    with ServerProcess(integrity_env(fake_llm, tmp_path, store_url), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            # Sequential: the retry comes after the first answer ended.
            sequential = WebhookClient(server.url, SECRET, http=http)
            body = sequential.body("message", text="Hi!")
            raw, headers = signed_delivery(sequential, body)
            once = await deliver(http, server.url, raw, headers)
            again = await deliver(http, server.url, raw, headers)
            requests_after_sequential = len(fake_llm.received)

            # Concurrent: the retry arrives while the first delivery is still streaming.
            concurrent = WebhookClient(server.url, SECRET, http=http)
            body2 = concurrent.body("message", text="Tell me something slow.")
            raw2, headers2 = signed_delivery(concurrent, body2)
            streaming = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                first_task = group.create_task(deliver(http, server.url, raw2, headers2, first_tts=streaming))
                await asyncio.wait_for(streaming.wait(), 30)
                second_task = group.create_task(deliver(http, server.url, raw2, headers2))
            first, second = first_task.result(), second_task.result()

            # A replayed session.end is stored once.
            end_raw, end_headers = signed_delivery(
                sequential,
                sequential.body("session.end", transcript=[{"role": "user", "text": "Hi!", "timestamp": 1}]),
            )
            end_once = await http.post(server.url, content=end_raw, headers=end_headers)
            end_again = await http.post(server.url, content=end_raw, headers=end_headers)
        log = server.log

    assert tts_text(once) == "Hello there, friend."
    assert_one_clean_end(once)
    assert tts_text(again) == tts_text(once), "a repeated delivery must speak what the first one spoke"
    assert_one_clean_end(again)
    assert requests_after_sequential == 1
    rows = await stored(store_url, sequential.conversation_id)
    assert briefs(rows) == [
        user("Hi!", body["turn_id"]),
        assistant("completed", "".join(quick), body["turn_id"]),
    ]

    assert tts_text(first) == spoken(slow), "the retry must not cut the first delivery short"
    assert_one_clean_end(first)
    assert tts_text(second) == tts_text(first), "a repeated delivery must speak what the first one spoke"
    assert_one_clean_end(second)
    assert len(fake_llm.received) == 2, "the concurrent retry reached the LLM"
    rows = await stored(store_url, concurrent.conversation_id)
    assert briefs(rows) == [
        user("Tell me something slow.", body2["turn_id"]),
        assistant("completed", "".join(slow), body2["turn_id"]),
    ]

    assert end_once.status_code == 200 and end_once.json() == {"status": "ok"}
    assert end_again.status_code == 200 and end_again.json() == {"status": "duplicate"}
    events = await session_events(store_url, sequential.conversation_id)
    assert [event.event_type for event in events] == ["session.end"]
    assert events[0].payload["transcript"] == [{"role": "user", "text": "Hi!", "timestamp": 1}]
    assert_clean_log(log)


async def test_a_repeated_delivery_speaks_the_reply_as_cleaned_for_voice(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    # Models write markdown even when told not to; the caller must never hear "asterisk asterisk",
    # neither from the first delivery nor from the stored reply a repeated delivery is answered with.
    fake_llm.script(Reply(tokens=["**Hello**", " there,", " *friend*."]))
    store_url = sqlite_url(tmp_path / "data")
    with ServerProcess(integrity_env(fake_llm, tmp_path, store_url), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            client = WebhookClient(server.url, SECRET, http=http)
            raw, headers = signed_delivery(client, client.body("message", text="Hi!"))
            once = await deliver(http, server.url, raw, headers)
            again = await deliver(http, server.url, raw, headers)
    assert tts_text(once) == "Hello there, friend."
    assert len(fake_llm.received) == 1
    assert_one_clean_end(again)
    assert tts_text(again) == tts_text(once), "a repeated delivery must speak what the first one spoke"


# --- 3. A newer turn stops the one still streaming ------------------------------------------------------


async def test_latest_turn_wins_on_one_server(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    story = [f" story{index}" for index in range(60)]
    fake_llm.script(Reply(tokens=story, token_delay=0.1), Reply(tokens=["Okay,", " new", " topic."]))
    store_url = sqlite_url(tmp_path / "data")
    with ServerProcess(integrity_env(fake_llm, tmp_path, store_url), cwd=tmp_path) as server:
        async with WebhookClient(server.url, SECRET) as client:
            first = client.body("message", text="Tell me a story.")
            second = client.body("message", text="Actually, never mind.")
            events: list[dict[str, Any]] = []
            async with asyncio.TaskGroup() as group:
                newer: asyncio.Task[TurnResult] | None = None
                async for _, event in client.stream(first):
                    events.append(event)
                    if newer is None and types(events).count("response.tts") == 3:
                        # Still connected to turn 1: Layercode sends turn 2 anyway.
                        newer = group.create_task(client.turn(second))
            assert newer is not None
            answer = newer.result()
        log = server.log

    assert_one_clean_end(events)
    heard = tts_text(events)
    assert heard and spoken(story).startswith(heard) and len(heard) < len(spoken(story)), heard
    assert answer.text == "Okay, new topic."
    assert_one_clean_end(answer.events)
    assert len(fake_llm.received) == 2
    assert dialogue(fake_llm.received[1]) == [
        ("user", "Tell me a story."),
        ("assistant", f"{heard} {MARK}"),
        ("user", "Actually, never mind."),
    ]
    rows = await stored(store_url, client.conversation_id)
    assert briefs(rows) == [
        user("Tell me a story.", first["turn_id"]),
        assistant("interrupted", heard, first["turn_id"]),
        user("Actually, never mind.", second["turn_id"]),
        assistant("completed", "Okay, new topic.", second["turn_id"]),
    ]
    assert_clean_log(log)


# --- 4. Two servers sharing Redis -------------------------------------------------------------------


def answer_by_request(received: Received) -> Reply:
    """A reply naming the turn it answers and how many messages the LLM was given for it."""
    said = dialogue(received)
    last = said[-1][1] if said else ""
    return Reply(tokens=["Answer", *(f" {word}" for word in last.split()), f" seen{len(said)}"], token_delay=0.005)


def expected_answer(user_text: str, seen: int) -> str:
    return f"Answer {user_text} seen{seen}"


async def test_two_servers_sharing_redis_alternate_turns_without_losing_any(
    tmp_path: Path, fake_llm: FakeOpenAI, redis_url: str
) -> None:
    fake_llm.responder = answer_by_request
    env = integrity_env(fake_llm, tmp_path, redis_url)
    conversation_id = "lc_conv_shared_redis"
    expected: list[tuple[str | None, str | None, str, str | None]] = []
    said: list[tuple[str, str]] = []
    with ServerProcess(env, cwd=tmp_path) as a, ServerProcess(env, cwd=tmp_path) as b:
        async with (
            WebhookClient(a.url, SECRET, conversation_id=conversation_id) as on_a,
            WebhookClient(b.url, SECRET, conversation_id=conversation_id, session_id=on_a.session_id) as on_b,
        ):
            for index in range(6):
                client = (on_a, on_b)[index % 2]
                text = f"turn{index} via {'ab'[index % 2]}"
                body = client.body("message", text=text)
                result = await client.turn(body)
                reply = expected_answer(text, len(said) + 1)
                assert result.text == reply, (index, result.text)
                assert_one_clean_end(result.events)
                # The LLM got the whole conversation so far, in order, whichever server asked.
                assert dialogue(fake_llm.received[-1]) == [*said, ("user", text)], index
                said += [("user", text), ("assistant", reply)]
                expected += [user(text, body["turn_id"]), assistant("completed", reply, body["turn_id"])]
        logs = a.log + b.log
    assert len(fake_llm.received) == 6
    rows = await stored(redis_url, conversation_id)
    assert len(rows) == 12
    assert briefs(rows) == expected
    assert_clean_log(logs)


async def test_latest_turn_wins_across_servers_sharing_redis(
    tmp_path: Path, fake_llm: FakeOpenAI, redis_url: str
) -> None:
    story = [f" tale{index}" for index in range(100)]  # 10 s if nothing stops it
    fake_llm.script(Reply(tokens=story, token_delay=0.1), Reply(tokens=["Fine,", " your", " turn."]))
    env = integrity_env(fake_llm, tmp_path, redis_url)
    conversation_id = "lc_conv_cross_server"
    with ServerProcess(env, cwd=tmp_path) as a, ServerProcess(env, cwd=tmp_path) as b:
        async with (
            WebhookClient(a.url, SECRET, conversation_id=conversation_id) as on_a,
            WebhookClient(b.url, SECRET, conversation_id=conversation_id, session_id=on_a.session_id) as on_b,
        ):
            first = on_a.body("message", text="Tell me a tale.")
            second = on_b.body("message", text="Stop, my turn.")
            events: list[dict[str, Any]] = []
            sent_second_at: float | None = None
            async with asyncio.TaskGroup() as group:
                newer: asyncio.Task[TurnResult] | None = None
                async for _, event in on_a.stream(first):
                    events.append(event)
                    if newer is None and types(events).count("response.tts") == 3:
                        sent_second_at = time.monotonic()
                        newer = group.create_task(on_b.turn(second))
                ended_after = time.monotonic() - (sent_second_at or 0)
                print(f"server A ended its superseded turn {ended_after:.2f} s after server B got the newer one")
            assert newer is not None
            answer = newer.result()
        logs = a.log + b.log

    assert_one_clean_end(events)
    heard = tts_text(events)
    assert heard and spoken(story).startswith(heard) and len(heard) < len(spoken(story)), heard
    # Server A noticed server B's newer turn through the store, well before its 10 s reply would end.
    assert ended_after < 5, ended_after
    assert answer.text == "Fine, your turn."
    assert_one_clean_end(answer.events)
    assert len(fake_llm.received) == 2
    assert fake_llm.received[0].tokens_sent < 80
    assert dialogue(fake_llm.received[1]) == [
        ("user", "Tell me a tale."),
        ("assistant", f"{heard} {MARK}"),
        ("user", "Stop, my turn."),
    ]
    rows = await stored(redis_url, conversation_id)
    assert briefs(rows) == [
        user("Tell me a tale.", first["turn_id"]),
        assistant("interrupted", heard, first["turn_id"]),
        user("Stop, my turn.", second["turn_id"]),
        assistant("completed", "Fine, your turn.", second["turn_id"]),
    ]
    assert_clean_log(logs)


async def test_a_duplicate_delivered_to_the_other_server_mid_stream_is_answered_once(
    tmp_path: Path, fake_llm: FakeOpenAI, redis_url: str
) -> None:
    # A load balancer retrying a webhook on another server while the first one still streams it.
    slow = ["Here", *(f" bit{index}" for index in range(15))]
    fake_llm.script(Reply(tokens=slow, token_delay=0.1))
    env = integrity_env(fake_llm, tmp_path, redis_url)
    with ServerProcess(env, cwd=tmp_path) as a, ServerProcess(env, cwd=tmp_path) as b:
        async with httpx.AsyncClient(timeout=60) as http:
            client = WebhookClient(a.url, SECRET, http=http)
            body = client.body("message", text="Say something.")
            raw, headers = signed_delivery(client, body)
            streaming = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                on_a = group.create_task(deliver(http, a.url, raw, headers, first_tts=streaming))
                await asyncio.wait_for(streaming.wait(), 30)
                on_b = group.create_task(deliver(http, b.url, raw, headers))
        logs = a.log + b.log
    first, second = on_a.result(), on_b.result()
    assert tts_text(first) == spoken(slow)
    assert_one_clean_end(first)
    assert tts_text(second) == tts_text(first)
    assert_one_clean_end(second)
    assert len(fake_llm.received) == 1
    rows = await stored(redis_url, client.conversation_id)
    assert briefs(rows) == [
        user("Say something.", body["turn_id"]),
        assistant("completed", "".join(slow), body["turn_id"]),
    ]
    assert_clean_log(logs)


# --- 5. Two workers on SQLite (or Redis) under load ------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_two_workers_keep_fifty_concurrent_conversations_whole(
    tmp_path: Path, fake_llm: FakeOpenAI, backend: str, request: pytest.FixtureRequest
) -> None:
    conversations, turns = 50, 4
    fake_llm.responder = answer_by_request
    store_url = sqlite_url(tmp_path / "data") if backend == "sqlite" else str(request.getfixturevalue("redis_url"))
    started = time.monotonic()
    with ServerProcess(integrity_env(fake_llm, tmp_path, store_url), cwd=tmp_path, args=("--workers", "2")) as server:
        limits = httpx.Limits(max_connections=conversations * 2, max_keepalive_connections=conversations * 2)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:

            async def converse(number: int) -> list[tuple[dict[str, Any], TurnResult]]:
                client = WebhookClient(server.url, SECRET, conversation_id=f"lc_conv_load{number:02d}", http=http)
                done: list[tuple[dict[str, Any], TurnResult]] = []
                for turn in range(turns):
                    body = client.body("message", text=f"c{number} t{turn}")
                    done.append((body, await client.turn(body)))
                return done

            load_started = time.monotonic()
            results = await asyncio.gather(*(converse(number) for number in range(conversations)))
            load_seconds = time.monotonic() - load_started
        log = server.log
    print(f"{conversations}x{turns} turns in {load_seconds:.1f} s ({time.monotonic() - started:.1f} s with start-up)")

    for number, done in enumerate(results):
        expected: list[tuple[str | None, str | None, str, str | None]] = []
        for turn, (body, result) in enumerate(done):
            reply = expected_answer(body["text"], 2 * turn + 1)
            assert result.status == 200, (number, turn, result.body)
            assert result.text == reply, (number, turn, result.text)
            assert_one_clean_end(result.events)
            expected += [user(body["text"], body["turn_id"]), assistant("completed", reply, body["turn_id"])]
        assert briefs(await stored(store_url, f"lc_conv_load{number:02d}")) == expected, number

    # One LLM request per turn, each carrying its conversation's whole history in order.
    assert len(fake_llm.received) == conversations * turns
    for received in fake_llm.received:
        said = dialogue(received)
        number, turn = (int(word[1:]) for word in said[-1][1].split())
        history: list[tuple[str, str]] = []
        for earlier in range(turn):
            text = f"c{number} t{earlier}"
            history += [("user", text), ("assistant", expected_answer(text, 2 * earlier + 1))]
        assert said == [*history, ("user", f"c{number} t{turn}")]
    assert_clean_log(log)


# --- 6. A server killed mid-stream ----------------------------------------------------------------


@pytest.mark.parametrize("replacement", ["standby", "restarted"])
async def test_sigkill_mid_stream_leaves_a_turn_the_next_server_closes(
    tmp_path: Path, fake_llm: FakeOpenAI, replacement: str
) -> None:
    story = [f" part{index}" for index in range(100)]
    fake_llm.script(Reply(tokens=story, token_delay=0.1), Reply(tokens=["Yes,", " I", " am", " back."]))
    store_url = sqlite_url(tmp_path / "data")
    env = integrity_env(fake_llm, tmp_path, store_url)
    conversation_id = "lc_conv_killed"
    with ExitStack() as servers:
        doomed = servers.enter_context(ServerProcess(env, cwd=tmp_path))
        # "standby": the next server already runs on the same data folder, so it finds the dead worker's
        # heartbeat still fresh and has to wait for the handover; "restarted": it starts after the crash.
        standby = servers.enter_context(ServerProcess(env, cwd=tmp_path)) if replacement == "standby" else None
        async with WebhookClient(doomed.url, SECRET, conversation_id=conversation_id) as client:
            first = client.body("message", text="Tell me everything.")
            events: list[dict[str, Any]] = []
            with pytest.raises(httpx.TransportError):
                async for _, event in client.stream(first):
                    events.append(event)
                    if types(events).count("response.tts") == 3:
                        doomed.kill()
        assert "response.end" not in types(events)

        # What the crash left: the caller's words and the placeholder of a reply nobody finished.
        rows = await stored(store_url, conversation_id)
        assert briefs(rows) == [
            user("Tell me everything.", first["turn_id"]),
            assistant("pending", "", first["turn_id"]),
        ]

        server = standby or servers.enter_context(ServerProcess(env, cwd=tmp_path))
        async with WebhookClient(server.url, SECRET, conversation_id=conversation_id) as client:
            second = client.body("message", text="Hello? Are you there?")
            asked = time.monotonic()
            answer = await client.turn(second)
            waited = time.monotonic() - asked
        log = server.log
    print(f"{replacement}: the turn after the crash was answered in {waited:.2f} s")

    assert answer.text == "Yes, I am back."
    assert_one_clean_end(answer.events)
    # The dead worker's heartbeat lapses (5 s) or the handover timeout (3 s) passes, whichever first.
    assert waited < 10, waited
    assert len(fake_llm.received) == 2
    assert fake_llm.received[0].tokens_sent < 60
    # Nothing of the lost reply reaches the model: the caller's two messages follow each other.
    assert dialogue(fake_llm.received[1]) == [("user", "Tell me everything."), ("user", "Hello? Are you there?")]
    rows = await stored(store_url, conversation_id)
    assert [row.role for row in rows] == ["user", "assistant", "user", "assistant"]
    assert rows[0].brief == user("Tell me everything.", first["turn_id"])
    assert rows[1].status in {"lost", "interrupted"} and rows[1].turn_id == first["turn_id"]
    assert rows[1].text == "", "a lost reply must not keep text nobody heard"
    assert rows[2].brief == user("Hello? Are you there?", second["turn_id"])
    assert rows[3].brief == assistant("completed", "Yes, I am back.", second["turn_id"])
    assert_clean_log(log)


# --- 7. Replays never touch the turn streaming, nor take the slot the next turn needs -------------------


async def attempt(http: httpx.AsyncClient, url: str, raw: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """POST exact bytes and headers; the status and whatever was spoken (a refusal speaks nothing)."""
    async with http.stream("POST", url, content=raw, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, ""
        parser = SSEParser()
        events = [event async for chunk in response.aiter_raw() for event in parser.feed(chunk)]
    assert_one_clean_end(events)
    return 200, tts_text(events)


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("servers", ["one server on SQLite", "two servers sharing Redis"])
async def test_replayed_webhooks_never_cut_the_reply_streaming(
    tmp_path: Path, fake_llm: FakeOpenAI, servers: str, request: pytest.FixtureRequest
) -> None:
    slow = ["Slowly", *(f" slow{index}" for index in range(40))]
    fake_llm.script(Reply(tokens=["Earlier", " reply."]), Reply(tokens=slow, token_delay=0.1))
    shared = servers.startswith("two")
    store_url = str(request.getfixturevalue("redis_url")) if shared else sqlite_url(tmp_path / "data")
    env = server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="Welcome aboard.", store_url=store_url)
    with ExitStack() as stack:
        a = stack.enter_context(ServerProcess(env, cwd=tmp_path))
        b = stack.enter_context(ServerProcess(env, cwd=tmp_path)) if shared else a
        async with httpx.AsyncClient(timeout=60) as http:
            client = WebhookClient(a.url, SECRET, http=http)
            start_body = client.body("session.start")
            start = signed_delivery(client, start_body)
            earlier_body = client.body("message", text="Say something short.")
            earlier = signed_delivery(client, earlier_body)
            streaming_body = client.body("message", text="Now say something long.")
            welcome = await deliver(http, a.url, *start)
            said_earlier = await deliver(http, a.url, *earlier)

            # While the long reply streams on A, its conversation's earlier webhooks are replayed, signed as
            # they were and within the signature tolerance, to A or to the other server.
            spoke = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                long_reply = group.create_task(
                    deliver(http, a.url, *signed_delivery(client, streaming_body), first_tts=spoke)
                )
                await asyncio.wait_for(spoke.wait(), 30)
                replayed_while = not long_reply.done()
                replays = [await attempt(http, b.url, *earlier), await attempt(http, b.url, *start)]
        logs = a.log + (b.log if shared else "")

    assert replayed_while, "the replays came after the long reply ended: this test proved nothing"
    assert replays == [(200, tts_text(said_earlier)), (200, tts_text(welcome))]
    assert tts_text(welcome) == "Welcome aboard." and tts_text(said_earlier) == "Earlier reply."
    streamed = long_reply.result()
    assert tts_text(streamed) == spoken(slow), "a replay cut the reply streaming"
    assert_one_clean_end(streamed)
    assert len(fake_llm.received) == 2
    rows = await stored(store_url, client.conversation_id)
    assert briefs(rows) == [
        assistant("completed", "Welcome aboard.", start_body["turn_id"]),
        user("Say something short.", earlier_body["turn_id"]),
        assistant("completed", "Earlier reply.", earlier_body["turn_id"]),
        user("Now say something long.", streaming_body["turn_id"]),
        assistant("completed", "".join(slow), streaming_body["turn_id"]),
    ]
    assert "superseded" not in logs and "did not close in time" not in logs
    assert_clean_log(logs)


async def test_replays_of_the_reply_streaming_never_take_the_next_turns_stream(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    slow = ["Slowly", *(f" slow{index}" for index in range(100))]
    fake_llm.script(Reply(tokens=slow, token_delay=0.1), Reply(tokens=["Next", " turn."]))
    env = {**integrity_env(fake_llm, tmp_path, sqlite_url(tmp_path / "data")), "MAX_STREAMS_PER_CONVERSATION": "2"}
    with ServerProcess(env, cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            client = WebhookClient(server.url, SECRET, http=http)
            first_body = client.body("message", text="Tell me everything.")
            first = signed_delivery(client, first_body)
            spoke = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                streaming = group.create_task(deliver(http, server.url, *first, first_tts=spoke))
                await asyncio.wait_for(spoke.wait(), 30)
                # A flood of replays of the delivery now streaming: one may wait for its reply beside it, the
                # rest are refused; none of them may take the stream the caller's next message needs.
                flood = [group.create_task(attempt(http, server.url, *first)) for _ in range(6)]
                for _ in range(3000):
                    if sum(task.done() for task in flood) >= 5:
                        break
                    await asyncio.sleep(0.01)
                refused = [task.result()[0] for task in flood if task.done()]
                next_body = client.body("message", text="Stop, next question.")
                answer = await client.turn(next_body)
        log = server.log

    assert refused == [429] * 5, refused
    assert answer.status == 200, answer.body
    assert answer.text == "Next turn."
    assert_one_clean_end(answer.events)
    heard = tts_text(streaming.result())
    assert_one_clean_end(streaming.result())
    assert heard and spoken(slow).startswith(heard) and len(heard) < len(spoken(slow))
    waited = [task.result() for task in flood if task.result()[0] == 200]
    assert [(status, words(text)) for status, text in waited] == [(200, words(heard))]
    assert len(fake_llm.received) == 2
    rows = await stored(sqlite_url(tmp_path / "data"), client.conversation_id)
    assert briefs(rows) == [
        user("Tell me everything.", first_body["turn_id"]),
        assistant("interrupted", heard, first_body["turn_id"]),
        user("Stop, next question.", next_body["turn_id"]),
        assistant("completed", "Next turn.", next_body["turn_id"]),
    ]
    assert "Traceback" not in log


# --- 8. The store goes away while a reply streams -----------------------------------------------------


async def logged(server: ServerProcess, line: str, *, within: float = 60) -> bool:
    """Whether the server logs `line` within `within` seconds (a generous bound: only a failure waits it out)."""
    deadline = time.monotonic() + within
    while line not in server.log:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.parametrize("redis_back", ["while the reply is retried", "after the retries gave up"])
async def test_a_reply_heard_in_full_during_a_redis_outage_is_kept(
    tmp_path: Path, fake_llm: FakeOpenAI, redis_back: str
) -> None:
    tokens = ["All", *(f" of{index}" for index in range(20))]
    fake_llm.script(Reply(tokens=tokens, token_delay=0.1), Reply(tokens=["Go", " on."]))
    retried = redis_back.startswith("while")
    kept_in = tmp_path / "redis-data"
    kept_in.mkdir()
    redis = RedisServer(keep_data_in=kept_in).start()  # A Redis that persists, so a restart loses nothing.
    try:
        env = {**integrity_env(fake_llm, tmp_path, redis.url), "STORE_RETRY_SECONDS": "120" if retried else "0.5"}
        with ServerProcess(env, cwd=tmp_path) as server:
            async with WebhookClient(server.url, SECRET) as client:
                first_body = client.body("message", text="Tell me all of it.")
                events: list[dict[str, Any]] = []
                async for _, event in client.stream(first_body):
                    events.append(event)
                    if types(events).count("response.tts") == 2:
                        await asyncio.to_thread(redis.stop)  # Redis goes down while the reply streams.
                failed = await logged(server, "could not store the reply")
                gave_up = retried or await logged(server, "gave up storing the reply of turn")
                redis = RedisServer(port=redis.port, keep_data_in=kept_in).start()
                stored_late = not retried or await logged(server, "stored the reply of turn")
                second_body = client.body("message", text="And then?")
                second = await client.turn(second_body)
            log = server.log
        rows = await stored(redis.url, client.conversation_id)
    finally:
        redis.stop()

    assert tts_text(events) == spoken(tokens), "the caller heard the whole reply"
    assert_one_clean_end(events)
    assert failed, log
    assert second.text == "Go on."
    assert_one_clean_end(second.events)
    # The model is told what it said, in full.
    assert dialogue(fake_llm.received[1]) == [
        ("user", "Tell me all of it."),
        ("assistant", "".join(tokens)),
        ("user", "And then?"),
    ]
    assert briefs(rows) == [
        user("Tell me all of it.", first_body["turn_id"]),
        assistant("completed", "".join(tokens), first_body["turn_id"]),
        user("And then?", second_body["turn_id"]),
        assistant("completed", "Go on.", second_body["turn_id"]),
    ]
    assert gave_up and stored_late, log
    assert "Traceback" not in log
