from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls

from layercode_agent.protocol import sign

from ..fakes.history import said
from .conftest import SECRET, AppFactory

pytestmark = pytest.mark.anyio


async def test_message_streams_tts_then_one_end(make_app: AppFactory) -> None:
    async with make_app() as app:
        client = app.client()
        body = client.body("message", text="Hi", turn_id="turn_1")
        result = await client.turn(body)
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache, no-transform"
    assert result.headers["x-accel-buffering"] == "no"
    assert result.text == "Hello there, friend."
    assert result.types[-1] == "response.end"
    assert result.types.count("response.end") == 1
    assert all(event["turn_id"] == "turn_1" for event in result.events)
    assert result.body.startswith(b'data: {"type":"response.tts","content":"Hello","turn_id":"turn_1"}\n\n')
    assert result.body.endswith(b'data: {"type":"response.end","turn_id":"turn_1"}\n\n')


async def test_history_is_kept_by_conversation_id_across_sessions(make_app: AppFactory) -> None:
    seen: list[list[tuple[str, str]]] = []

    async def recorder(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        seen.append(said(messages))
        yield f"Reply {len(seen)}."

    async with make_app(recorder) as app:
        first = app.client(conversation_id="conv_a", session_id="sess_1")
        await first.say("My name is Ada.")
        # A reconnect: new session_id, same conversation_id.
        second = app.client(conversation_id="conv_a", session_id="sess_2")
        await second.say("What is my name?")
        stored = await app.runtime.runner.store.load("conv_a")
    assert seen[1] == [
        ("user", "My name is Ada."),
        ("assistant", "Reply 1."),
        ("user", "What is my name?"),
    ]
    assert stored is not None
    assert said(stored.messages)[-1] == ("assistant", "Reply 2.")
    last = stored.messages[-1]
    assert isinstance(last, ModelResponse)
    assert last.metadata is not None and last.metadata["status"] == "completed"


async def test_user_message_is_stored_before_the_reply_streams(make_app: AppFactory) -> None:
    stored_before_reply: list[list[tuple[str, str]]] = []
    holder: dict[str, Any] = {}

    async def check_store(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        conversation = await holder["store"].load("conv_b")
        stored_before_reply.append(said(conversation.messages) if conversation else [])
        yield "ok"

    async with make_app(check_store) as app:
        holder["store"] = app.runtime.runner.store
        client = app.client(conversation_id="conv_b")
        await client.say("remember me", turn_id="t1")
        stored = await app.runtime.runner.store.load("conv_b")
    assert stored_before_reply == [[("user", "remember me")]]
    assert stored is not None
    first = stored.messages[0]
    assert isinstance(first, ModelRequest)
    assert first.metadata is not None
    assert {key: first.metadata[key] for key in ("turn_id", "role")} == {"turn_id": "t1", "role": "user"}
    assert len(first.metadata["delivery"]) == 64  # sha256 of the signed body, to recognise a repeat


async def test_session_start_speaks_the_welcome(make_app: AppFactory) -> None:
    async with make_app() as app:
        client = app.client()
        result = await client.start(turn_id="welcome_1")
        stored = await app.runtime.runner.store.load(client.conversation_id)
    assert result.events == [
        {"type": "response.tts", "content": "Welcome aboard.", "turn_id": "welcome_1"},
        {"type": "response.end", "turn_id": "welcome_1"},
    ]
    assert stored is not None and said(stored.messages) == [("assistant", "Welcome aboard.")]


async def test_empty_welcome_is_a_silent_start(make_app: AppFactory) -> None:
    async with make_app(welcome_message="") as app:
        result = await app.client().start(turn_id="w")
    assert result.events == [{"type": "response.end", "turn_id": "w"}]


async def test_data_event_gets_a_json_response_data(make_app: AppFactory) -> None:
    async with make_app() as app:
        client = app.client()
        response = await client.post(client.body("data", data={"clicked": "buy"}, turn_id="t9"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"type": "response.data", "content": {"status": "ok"}, "turn_id": "t9"}


async def test_session_end_and_update_are_stored(make_app: AppFactory) -> None:
    transcript = [
        {"role": "user", "text": "Hello", "timestamp": 1724848800000},
        {"role": "assistant", "text": "Hi there!", "timestamp": 1724848805000},
    ]
    async with make_app() as app:
        client = app.client(conversation_id="conv_end")
        end = await client.post(client.body("session.end", transcript=transcript, duration=180000, latency=120))
        update = await client.post(
            client.body("session.update", recording_status="completed", recording_url="https://x/rec.wav")
        )
        events = await app.runtime.runner.store.session_events("conv_end")
    assert end.status_code == 200 and update.status_code == 200
    assert [event.event_type for event in events] == ["session.end", "session.update"]
    assert events[0].payload["transcript"][1]["text"] == "Hi there!"
    assert events[0].payload["transcript"][0]["timestamp"] == 1724848800000
    assert events[1].payload["recording_url"] == "https://x/rec.wav"


async def test_unknown_event_type_is_acknowledged(make_app: AppFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="layercode_agent")
    async with make_app() as app:
        client = app.client()
        response = await client.post(client.body("agent.thinking", whatever=1))
    assert response.status_code == 200
    assert "agent.thinking" in caplog.text


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("missing signature", 401, "missing"),
        ("wrong secret", 401, "does not match"),
        ("stale timestamp", 401, "older"),
        ("future timestamp", 401, "future"),
        ("garbage header", 401, "malformed"),
        ("not json", 400, "JSON"),
        ("json array", 400, "object"),
        ("message without text", 422, "text"),
        ("no type", 422, "type"),
    ],
)
async def test_bad_input_is_refused_and_nothing_happens(
    make_app: AppFactory, case: str, status: int, reason: str
) -> None:
    calls: list[int] = []

    async def counting(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        calls.append(1)
        yield "should not run"

    good = json.dumps({"type": "message", "conversation_id": "conv_bad", "turn_id": "t", "text": "hi"}).encode()
    raw = good
    now = int(time.time())
    headers = {"content-type": "application/json", "layercode-signature": sign(good, SECRET, timestamp=now)}
    if case == "missing signature":
        del headers["layercode-signature"]
    elif case == "wrong secret":
        headers["layercode-signature"] = sign(good, "not-the-secret", timestamp=now)
    elif case == "stale timestamp":
        headers["layercode-signature"] = sign(good, SECRET, timestamp=now - 301)
    elif case == "future timestamp":
        headers["layercode-signature"] = sign(good, SECRET, timestamp=now + 310)  # clear of the 1 s truncation of `now`
    elif case == "garbage header":
        headers["layercode-signature"] = "sha256=abc"
    else:
        raw = {
            "not json": b"hello",
            "json array": b"[1, 2]",
            "message without text": b'{"type":"message","conversation_id":"conv_bad","turn_id":"t"}',
            "no type": b'{"conversation_id":"conv_bad"}',
        }[case]
        headers["layercode-signature"] = sign(raw, SECRET, timestamp=now)

    async with make_app(counting) as app:
        response = await app.client().post(raw, headers=headers)
        stored = await app.runtime.runner.store.load("conv_bad")
    assert response.status_code == status
    assert reason in response.json()["reason"]
    assert calls == []
    assert stored is None


async def test_body_over_one_mebibyte_is_413(make_app: AppFactory) -> None:
    raw = json.dumps({"type": "message", "conversation_id": "c", "text": "x" * (1024 * 1024)}).encode()
    async with make_app() as app:
        client = app.client()
        response = await client.post(raw, headers=client.signed(raw))
    assert response.status_code == 413


async def test_llm_failure_gets_a_spoken_apology_and_end(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield "Let me"
        raise RuntimeError("model server fell over")

    async with make_app(broken) as app:
        client = app.client(conversation_id="conv_fail")
        result = await client.say("hello", turn_id="tf")
        stored = await app.runtime.runner.store.load("conv_fail")
    assert result.types[-1] == "response.end" and result.types.count("response.end") == 1
    assert "Sorry" in result.text
    assert result.text.startswith("Let me")
    assert "model server fell over" in caplog.text
    assert stored is not None
    last = stored.messages[-1]
    assert isinstance(last, ModelResponse) and last.metadata is not None
    assert last.metadata["status"] == "failed"


async def test_llm_timeout_gets_a_spoken_apology(make_app: AppFactory) -> None:
    async def slow(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        await asyncio.sleep(10)
        yield "too late"

    async with make_app(slow, llm_timeout=0.3) as app:
        started = time.monotonic()
        result = await app.client().say("hello")
        elapsed = time.monotonic() - started
    assert "Sorry" in result.text
    assert result.types[-1] == "response.end"
    assert elapsed < 5


async def test_tool_call_speaks_a_filler_and_reports_status(make_app: AppFactory) -> None:
    async def with_tool(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if len(messages) == 1:
            yield {0: DeltaToolCall(name="current_time", json_args='{"timezone": "Europe/Paris"}')}
        else:
            yield "It is late in Paris."

    async with make_app(with_tool) as app:
        result = await app.client().say("What time is it in Paris?", turn_id="tt")
    assert result.types == [
        "response.tts",
        "response.data",
        "response.data",
        "response.tts",
        "response.end",
    ]
    assert result.events[0]["content"].strip() == "One moment while I check that."
    assert result.events[1]["content"] == {"tool": "current_time", "status": "running"}
    assert result.events[2]["content"] == {"tool": "current_time", "status": "done"}
    assert result.events[3]["content"] == "It is late in Paris."


async def test_markdown_and_emoji_never_reach_tts(make_app: AppFactory) -> None:
    async def markdown(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for chunk in ["**Sure", "!** Here", " you go 😀:\n", "- one\n- ", "two"]:
            yield chunk

    async with make_app(markdown) as app:
        result = await app.client().say("list")
    assert result.text == "Sure! Here you go : one two"
    assert result.events[0]["content"] == "Sure"
