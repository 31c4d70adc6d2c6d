"""The reply stream on the wire, under the real server: each event written as it exists, the hang-up noticed even while
the model is silent, the headers as Layercode and proxies expect, and the stream's slot given back however it ends.

The LLM is the OpenAI-compatible fake with a gate: it sends a token only once the test releases it, so "the event
arrived before the model sent the next token" is an ordering the test controls, not a duration it measures.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
from starlette.responses import StreamingResponse

from layercode_agent.client import WebhookClient
from layercode_agent.protocol import SSE_CONTENT_TYPE, SSE_HEADERS, EndResponse, TTSResponse, encode

from ..fakes.history import stored
from ..fakes.openai_server import FakeOpenAI, Received, Reply
from ..fakes.server_process import ServerProcess, server_env, sqlite_url
from .test_integrity import assert_one_clean_end, tts_text

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_sse_response"
DEADLINE = 60.0
"""Seconds a condition may take to come true on a busy machine: an upper bound, not a measurement."""
_T = TypeVar("_T")

WORDS = [f"Word{index}" if index == 0 else f" word{index}" for index in range(12)]


class Gate:
    """How many tokens of one reply the fake may send so far (read by the fake's thread, set by the test)."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed

    def release(self, count: int = 1) -> None:
        self.allowed += count


class GatedLLM(FakeOpenAI):
    """The fake LLM, each reply's tokens held back until its gate lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[Gate] = []
        self.released_at_start = 0
        self._lock = threading.Lock()

    async def _events(self, body: dict[str, Any], reply: Reply, received: Received) -> AsyncIterator[bytes]:
        with self._lock:
            gate = Gate(self.released_at_start)
            self.gates.append(gate)
        for index, token in enumerate(reply.tokens):
            while gate.allowed <= index:  # noqa: ASYNC110 - set from the test's thread, not this loop's
                await asyncio.sleep(0.005)
            delta: dict[str, Any] = {"content": token, **({"role": "assistant"} if index == 0 else {})}
            yield _chunk(body, delta)
            received.tokens_sent += 1
        yield _chunk(body, {}, finish="stop")
        yield b"data: [DONE]\n\n"


def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    payload = {"id": "chatcmpl-gated", "object": "chat.completion.chunk", "model": body.get("model", "fake")}
    return b"data: " + json.dumps({**payload, "created": int(time.time()), "choices": [choice]}).encode() + b"\n\n"


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[GatedLLM]:
    fake = GatedLLM()
    with fake:
        yield fake


@pytest.fixture
def llm(fake_llm: GatedLLM) -> GatedLLM:
    fake_llm.default = Reply(tokens=list(WORDS))
    fake_llm.released_at_start = 0
    return fake_llm


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DEADLINE:g} s: {what}")
        await asyncio.sleep(0.02)


async def within_deadline(awaitable: Awaitable[_T], what: str) -> _T:
    try:
        return await asyncio.wait_for(awaitable, DEADLINE)
    except TimeoutError:
        pytest.fail(f"not within {DEADLINE:g} s: {what}")


def events_of(client: WebhookClient, body: dict[str, Any]) -> AsyncGenerator[tuple[float, dict[str, Any]]]:
    # An async generator: closing it (aclosing) closes the HTTP request at once, as a caller hanging up does.
    return cast(AsyncGenerator[tuple[float, dict[str, Any]]], client.stream(body))


def server_for(llm: GatedLLM, tmp_path: Path, **settings: str) -> tuple[ServerProcess, str]:
    store_url = sqlite_url(tmp_path / "data")
    env = server_env(llm, tmp_path / "data", secret=SECRET, welcome="", store_url=store_url)
    return ServerProcess({**env, **settings}, cwd=tmp_path), store_url


async def test_each_delta_reaches_the_caller_before_the_model_sends_the_next(llm: GatedLLM, tmp_path: Path) -> None:
    server, _ = server_for(llm, tmp_path)
    with server:
        async with WebhookClient(server.url, SECRET) as client:
            events: list[dict[str, Any]] = []
            llm.released_at_start = 1  # The first token goes at once; each next one only once released.
            stream = events_of(client, client.body("message", text="say your words one by one"))
            async with aclosing(stream) as arriving:
                for index in range(len(WORDS)):
                    # The model has sent exactly `index + 1` tokens and holds the rest: the caller must already
                    # hear every one of them, so none waits in a buffer for the next.
                    while WORDS[index].strip() not in tts_text(events):
                        _, event = await within_deadline(anext(arriving), f"the event for token {index}")
                        events.append(event)
                    assert llm.received[-1].tokens_sent == index + 1
                    assert events[-1]["type"] == "response.tts"
                    llm.gates[-1].release()
                events.extend([event async for _, event in arriving])
    assert_one_clean_end(events)
    assert tts_text(events) == "".join(WORDS)


async def test_hanging_up_while_the_model_is_silent_stops_the_turn_and_keeps_what_was_sent(
    llm: GatedLLM, tmp_path: Path
) -> None:
    server, store_url = server_for(llm, tmp_path)
    llm.released_at_start = 3  # Three tokens, then the model says nothing more until the caller has gone.
    with server:
        async with WebhookClient(server.url, SECRET, conversation_id="conv_sse_hangup") as client:
            events: list[dict[str, Any]] = []
            stream = events_of(client, client.body("message", text="tell me everything"))
            async with aclosing(stream) as arriving:
                while WORDS[2].strip() not in tts_text(events):
                    _, event = await within_deadline(anext(arriving), "the first three words")
                    events.append(event)
            # The caller is gone while the server waits for the model: nothing is being written, yet the turn
            # must stop and close its LLM stream (no token is ever released again).
            received = llm.received[-1]
            await until(received.hung_up.is_set, "the server closes the LLM stream once the caller hung up")
            assert received.tokens_sent == 3

            async def interrupted() -> list[Any]:
                while True:
                    rows = await stored(store_url, client.conversation_id)
                    if rows and rows[-1].role == "assistant" and rows[-1].status == "interrupted":
                        return rows
                    await asyncio.sleep(0.05)

            rows = await within_deadline(interrupted(), "the turn is stored as interrupted")
            llm.released_at_start = len(WORDS)
            after = await client.say("are you still there?")
        log = server.log
    assert rows[-1].text == tts_text(events), "the store keeps exactly what the caller heard"
    assert after.status == 200 and after.text == "".join(WORDS)
    assert "Traceback" not in log and "Task was destroyed" not in log


async def test_the_stream_headers_are_those_of_an_event_stream(llm: GatedLLM, tmp_path: Path) -> None:
    server, _ = server_for(llm, tmp_path)
    llm.released_at_start = len(WORDS)
    with server:
        async with WebhookClient(server.url, SECRET) as client:
            result = await client.say("hello")
    assert result.status == 200
    assert_one_clean_end(result.events)
    headers = {name: value for name, value in result.headers.items() if name not in ("date", "server")}
    # What Starlette's streaming response (FastAPI's `EventSourceResponse`) sent for the same stream, and the
    # chunked framing uvicorn adds to a body of unknown length: nothing more, nothing less.
    before = StreamingResponse(iter([b""]), headers=SSE_HEADERS, media_type=SSE_CONTENT_TYPE)
    expected = {name.decode(): value.decode() for name, value in before.raw_headers}
    assert headers == {**expected, "transfer-encoding": "chunked"}
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache, no-transform" and headers["x-accel-buffering"] == "no"


async def test_streams_cut_off_give_their_slot_back(llm: GatedLLM, tmp_path: Path) -> None:
    server, _ = server_for(llm, tmp_path, MAX_STREAMS_PER_CONVERSATION="1")
    llm.released_at_start = 1  # Every reply: one word, then silence until the caller hangs up.
    cut_off = 3
    with server:
        async with WebhookClient(server.url, SECRET, conversation_id="conv_sse_slots") as client:
            for round_ in range(cut_off):
                # One stream at a time: the previous one's slot must come back once its caller has gone.
                deadline = time.monotonic() + DEADLINE
                while True:
                    events: list[dict[str, Any]] = []
                    try:
                        async with aclosing(events_of(client, client.body("message", text="hi"))) as arriving:
                            _, event = await within_deadline(anext(arriving), "the first word")
                            events.append(event)
                        break
                    except httpx.HTTPStatusError as exc:
                        assert exc.response.status_code == 429, exc
                        if time.monotonic() > deadline:
                            pytest.fail(f"stream {round_ + 1} refused for {DEADLINE:g} s: a slot was never released")
                        await asyncio.sleep(0.05)
                assert events[0]["type"] == "response.tts"
            # Once the last one is noticed gone, a whole reply streams again.
            await until(lambda: llm.received[-1].hung_up.is_set(), "the last cut-off turn stops")
            llm.released_at_start = len(WORDS)
            deadline = time.monotonic() + DEADLINE
            after = await client.say("are you there?")
            while after.status == 429 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                after = await client.say("are you there?")
    assert after.status == 200, after.status
    assert_one_clean_end(after.events)
    assert after.text == "".join(WORDS)


@pytest.mark.parametrize(
    "content",
    ["", " plain", 'quote " and \\ backslash', "line\nbreak\ttab\r", "\x00\x1f control", "é 中文 🙂", "\u2028\u2029"],
)
@pytest.mark.parametrize("turn_id", ["turn_1", None, 'odd "turn"\n'])
def test_a_tts_event_is_framed_as_the_general_json_path_frames_it(content: str, turn_id: str | None) -> None:
    event = TTSResponse(content=content, turn_id=turn_id)
    general = json.dumps(
        {"type": "response.tts", "content": content, "turn_id": turn_id}, separators=(",", ":"), ensure_ascii=False
    )
    assert encode(event) == b"data: " + general.encode() + b"\n\n"
    assert json.loads(encode(event).removeprefix(b"data: ")) == event.model_dump()


def test_a_tts_event_that_is_not_unicode_is_still_framed_as_ascii_json() -> None:
    event = TTSResponse(content="lone \ud800 surrogate", turn_id="t")
    assert encode(event) == b'data: {"type":"response.tts","content":"lone \\ud800 surrogate","turn_id":"t"}\n\n'
    assert encode(EndResponse(turn_id="t")) == b'data: {"type":"response.end","turn_id":"t"}\n\n'
