"""Turns whose model hands text straight to the turn (`agent.DIRECT_TEXT`): the lean model against the local fake.

The same behaviours as for any model (tests/test_turns.py): text before a tool call is spoken once and
stops the tool filler, a tool's own sub-agent is never spoken, a hang-up stores exactly what was sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models import override_allow_model_requests

from layercode_agent.agent import TOOL_FILLER, build_agent
from layercode_agent.agent.chat_completions import ChatCompletionsModel, EarlyRequest
from layercode_agent.protocol import MessageEvent, OutboundEvent
from layercode_agent.stores import MemoryStore
from layercode_agent.turns import TurnRunner
from layercode_agent.turns.timing import TurnObserver, TurnReport
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.test_turns import collect, history, message, read_then_hang_up, settled, spoken

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _allow_requests() -> Iterator[None]:  # pyright: ignore[reportUnusedFunction]
    with override_allow_model_requests(True):
        yield


@pytest.fixture
async def lean(fake_llm: FakeOpenAI) -> AsyncIterator[ChatCompletionsModel]:
    async with ChatCompletionsModel("fake-model", base_url=fake_llm.base_url, api_key="sk-test") as model:
        yield model


def _sse(*deltas: dict[str, Any]) -> list[bytes]:
    chunks = [{"id": "c", "model": "fake-model", "choices": [{"index": 0, "delta": d}]} for d in deltas]
    return [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks] + [b"data: [DONE]\n\n"]


def _call(name: str | None, args: str, call_id: str | None = None) -> dict[str, Any]:
    return {"tool_calls": [{"index": 0, "id": call_id, "function": {"name": name, "arguments": args}}]}


async def test_text_before_a_tool_is_spoken_once_and_a_sub_agent_never(
    fake_llm: FakeOpenAI, lean: ChatCompletionsModel
) -> None:
    fake_llm.script(
        Reply(raw=_sse({"content": "Let me"}, {"content": " ask."}, _call("ask_helper", '{"q": "x"}', "call_1"))),
        Reply(tokens=["SECRET", " notes"]),  # The tool's sub-agent: its answer is the tool's result, never spoken.
        Reply(tokens=[" It", " is", " done."]),
    )
    agent = build_agent(model=lean, tools=False)
    helper = Agent(lean)

    @agent.tool_plain
    async def ask_helper(q: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """Ask the helper."""
        async with helper.run_stream(q) as run:
            return "".join([chunk async for chunk in run.stream_text(delta=True)])

    store = MemoryStore()
    runner = TurnRunner(agent=agent, store=store, poll_interval=0.02)
    events = await collect(runner.stream_message(message("hi", "t1")))
    said = spoken(events)
    assert said == "Let me ask. It is done."
    assert "SECRET" not in said and TOOL_FILLER not in said
    assert [e.type for e in events].count("response.end") == 1
    await settled(runner)
    replies = [m for m in await history(store) if isinstance(m, ModelResponse)]
    assert [p for p in replies[0].parts if isinstance(p, TextPart)] == [TextPart(content="Let me ask.")]
    assert any(isinstance(p, ToolCallPart) for p in replies[0].parts)
    assert replies[-1].parts == [TextPart(content=" It is done.")]
    assert fake_llm.received[2].messages[-1]["content"] == "SECRET notes"  # The sub-agent did answer the tool.


async def test_a_hang_up_stores_exactly_what_was_sent(fake_llm: FakeOpenAI, lean: ChatCompletionsModel) -> None:
    fake_llm.script(Reply(tokens=[f" w{n}" for n in range(200)], token_delay=0.02))
    store = MemoryStore()
    runner = TurnRunner(agent=build_agent(model=lean), store=store, poll_interval=0.02)
    heard = await read_then_hang_up(runner.stream_message(message("talk", "t1")), 3)
    await settled(runner)
    (reply,) = [m for m in await history(store) if isinstance(m, ModelResponse)]
    assert reply.parts[0] == TextPart(content=heard) and heard.count("w") >= 3
    assert (reply.metadata or {}).get("status") == "interrupted"
    assert fake_llm.received[0].tokens_sent < 200


async def test_a_turns_request_leaves_before_the_agent_asks_and_is_the_agents_own(
    fake_llm: FakeOpenAI, lean: ChatCompletionsModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    handles: list[EarlyRequest | None] = []
    open_early = lean.open_early

    async def kept(messages: Any) -> EarlyRequest | None:
        handles.append(await open_early(messages))
        return handles[-1]

    monkeypatch.setattr(lean, "open_early", kept)
    store = MemoryStore()
    runner = TurnRunner(agent=build_agent(tools=False), model=lean, store=store, poll_interval=0.02)
    for index in range(3):
        events = await collect(runner.stream_message(message(f"question {index}", f"t{index}")))
        assert spoken(events) == "Hello there, how can I help?"
        await settled(runner)

    assert len(handles) == 3 and all(handle is not None and handle.taken for handle in handles)
    assert handles[0] is not None and handles[0].task is None  # The first turn had nothing to go by.
    assert all(handle is not None and handle.task is not None for handle in handles[1:])
    assert len(fake_llm.received) == 3 and all(received.completed for received in fake_llm.received)
    assert [m["content"] for m in fake_llm.received[2].messages if m["role"] == "user"] == [
        "question 0",
        "question 1",
        "question 2",
    ]
    assert lean._early_misses == 0  # pyright: ignore[reportPrivateUsage]


async def _guess(runner: TurnRunner, event: MessageEvent, delivery: str) -> EarlyRequest | None:
    """The early request the webhook route would send for `event` (delivered as the body `delivery`)."""
    return await runner.guess_early(event, await runner.sessions.check_delivery(event, delivery), delivery)


def _answer(runner: TurnRunner, event: MessageEvent) -> Coroutine[Any, Any, list[OutboundEvent]]:
    """What the webhook route does with a verified `message`: the early guess first, then the turn."""

    async def answer() -> list[OutboundEvent]:
        delivery = f"digest-{event.turn_id}"
        early = await _guess(runner, event, delivery)
        return await collect(runner.stream_message(event, delivery=delivery, early=early))

    return answer()


class _Reports(TurnObserver):
    def __init__(self) -> None:
        self.reports: list[TurnReport] = []

    def turn_finished(self, report: TurnReport) -> None:
        self.reports.append(report)


def _runner(store: MemoryStore, lean: ChatCompletionsModel, observer: TurnObserver | None = None) -> TurnRunner:
    return TurnRunner(agent=build_agent(tools=False), model=lean, store=store, poll_interval=0.02, observer=observer)


async def _after_a_turn(
    store: MemoryStore, lean: ChatCompletionsModel, text: str, observer: TurnObserver | None = None
) -> TurnRunner:
    """A runner that has answered one turn of the conversation (`text`), its close written."""
    runner = _runner(store, lean, observer)
    await _answer(runner, message(text, "t1"))
    await settled(runner)
    return runner


def _users(received: Any) -> list[str]:
    """What the caller said, in the order a request to the LLM carries it."""
    return [m["content"] for m in received.messages if m["role"] == "user"]


class _GatedStore(MemoryStore):
    """A memory store whose log rewrites wait while `gate` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def rewrite(self, conversation_id: str, plan: Any, *, attempts: int = 12) -> Any:
        await self.gate.wait()
        return await super().rewrite(conversation_id, plan, attempts=attempts)


async def test_a_later_turns_request_leaves_before_its_record_is_begun(
    fake_llm: FakeOpenAI, lean: ChatCompletionsModel
) -> None:
    store = _GatedStore()
    observed = _Reports()
    runner = await _after_a_turn(store, lean, "first", observed)

    store.gate.clear()  # The second turn's begin waits for the store...
    await asyncio.sleep(0.05)
    second = asyncio.create_task(_answer(runner, message("second", "t2")))
    for _ in range(500):
        if len(fake_llm.received) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(fake_llm.received) == 2  # ...and its request has reached the LLM meanwhile.
    assert _users(fake_llm.received[1]) == ["first", "second"]
    store.gate.set()
    assert spoken(await second) == "Hello there, how can I help?"
    await settled(runner)
    assert len(fake_llm.received) == 2 and fake_llm.received[1].completed  # The agent's own request took it.
    assert lean._early_misses == 0  # pyright: ignore[reportPrivateUsage]
    assert [m.metadata["role"] for m in await history(store) if m.metadata] == ["user", "assistant"] * 2
    # Its report says when the request really left: before the history was loaded, not after the set-up.
    stages = observed.reports[-1].stages
    assert stages["llm_request"] < stages["history_loaded"] < stages["llm_first_token"]


async def test_no_request_is_guessed_on_a_log_another_worker_changed_since(
    fake_llm: FakeOpenAI, lean: ChatCompletionsModel
) -> None:
    store = MemoryStore()
    here, there = await _after_a_turn(store, lean, "one"), _runner(store, lean)
    await _answer(there, message("two", "t2"))  # The log moves on without this worker.
    await settled(there)
    third = message("three", "t3")
    assert await _guess(here, third, "digest-t3") is None
    events = await _answer(here, third)
    await settled(here)

    assert spoken(events) == "Hello there, how can I help?"
    # One request per turn: the third, made after its begin read the log, knows the second.
    assert len(fake_llm.received) == 3 and all(received.completed for received in fake_llm.received)
    assert _users(fake_llm.received[2]) == ["one", "two", "three"]
    assert lean._early_misses == 0  # pyright: ignore[reportPrivateUsage]


async def test_a_guess_the_agent_does_not_make_is_closed_unheard(
    fake_llm: FakeOpenAI, lean: ChatCompletionsModel
) -> None:
    store = MemoryStore()
    runner = await _after_a_turn(store, lean, "one")
    runner.agent = build_agent(tools=False, system_prompt="Answer in French.")  # Its next request is not the guess.
    # The guess would stream for seconds: it is closed as soon as the agent's own request differs.
    fake_llm.script(Reply(tokens=[" guessed"] * 200, token_delay=0.02), Reply(tokens=["Bien", "."]))
    events = await _answer(runner, message("two", "t2"))
    await settled(runner)

    assert spoken(events) == "Bien."
    guessed, asked = fake_llm.received[1], fake_llm.received[2]
    assert _users(guessed) == ["one", "two"]
    assert await asyncio.to_thread(guessed.hung_up.wait, 10)
    assert not guessed.completed and guessed.tokens_sent < 200
    assert asked.completed and asked.messages[0]["content"] == "Answer in French."
    assert lean._early_misses == 1  # pyright: ignore[reportPrivateUsage]
    replies = [m for m in await history(store) if isinstance(m, ModelResponse)]
    assert replies[-1].parts == [TextPart(content="Bien.")]  # What was heard is what is stored.


async def test_no_request_is_guessed_for_a_message_that_barges_in(
    fake_llm: FakeOpenAI, lean: ChatCompletionsModel
) -> None:
    store = MemoryStore()
    runner = await _after_a_turn(store, lean, "one")
    barging = message("two", "t2", interruption_context={"previous_turn_interrupted": True, "words_heard": 2})
    assert await _guess(runner, barging, "digest-t2") is None


async def test_a_repeated_delivery_is_never_guessed(fake_llm: FakeOpenAI, lean: ChatCompletionsModel) -> None:
    store = MemoryStore()
    runner = await _after_a_turn(store, lean, "one")
    again = message("one", "t1")
    assert await _guess(runner, again, "digest-t1") is None  # By its turn id...
    renamed = message("one", "t1-renamed")
    assert await _guess(runner, renamed, "digest-t1") is None  # ...or by its body's digest.
    replayed = await _answer(runner, again)
    await settled(runner)
    assert spoken(replayed) == "Hello there, how can I help?"  # Answered from the log...
    assert len(fake_llm.received) == 1  # ...and the LLM asked once, by the first delivery.
