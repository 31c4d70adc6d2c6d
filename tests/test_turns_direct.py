"""Turns whose model hands text straight to the turn (`agent.DIRECT_TEXT`): the lean model against the local fake.

The same behaviours as for any model (tests/test_turns.py): text before a tool call is spoken once and
stops the tool filler, a tool's own sub-agent is never spoken, a hang-up stores exactly what was sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models import override_allow_model_requests

from layercode_agent.agent import TOOL_FILLER, build_agent
from layercode_agent.agent.chat_completions import ChatCompletionsModel, EarlyRequest
from layercode_agent.stores import MemoryStore
from layercode_agent.turns import TurnRunner
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
