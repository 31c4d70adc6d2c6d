"""The lean Chat Completions model against a real llama.cpp server (xllamacpp, SmolLM2-135M) over loopback.

SmolLM2-135M cannot be made to emit a tool call: its chat template has no tool format, and with a
Hermes-style template, `tool_choice: "required"` or a named function, and few-shot examples it still
answers in text (and llama.cpp refuses a custom grammar together with tools). So the tool-call deltas
in pieces are tested against the fake server (tests/agent/test_chat_completions.py); here llama.cpp
checks what it can: token streaming, usage, finish reasons, errors, and that a history with tool
calls and their results, with tools offered, is a request a real server accepts.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic_ai import Agent, ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import ModelRequestParameters, override_allow_model_requests
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import ToolDefinition

from layercode_agent.agent.chat_completions import ChatCompletionsModel
from tests.fakes.net import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WEATHER = ToolDefinition(
    name="weather",
    description="The weather in a city.",
    parameters_json_schema={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


class LlamaServer:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    """llama.cpp's OpenAI-compatible HTTP server on a loopback port, with the SmolLM2 weights."""
    xllamacpp: Any = pytest.importorskip("xllamacpp")
    from layercode_agent.agent.local import LocalModelUnavailable, weights_path

    try:
        path = weights_path()
    except LocalModelUnavailable as exc:
        pytest.skip(str(exc))
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.offline = True
    params.n_ctx = 2048
    params.n_parallel = 1
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    params.cpuparams.poll = 0
    params.cpuparams_batch.poll = 0
    params.cache_ram_mib = 64
    params.verbosity = 0
    params.ui = False
    params.endpoint_metrics = False
    params.endpoint_slots = False
    params.n_threads_http = 2
    api_key = secrets.token_urlsafe(16)
    params.api_keys = [api_key]
    port = free_port()
    params.hostnames = ["127.0.0.1"]
    params.port = port
    server = xllamacpp.Server(params)
    yield LlamaServer(f"http://127.0.0.1:{port}/v1", api_key)
    del server


@pytest.fixture(autouse=True)
def _allow_requests() -> Iterator[None]:  # pyright: ignore[reportUnusedFunction]
    with override_allow_model_requests(True):
        yield


@pytest.fixture
async def model(llama: LlamaServer) -> AsyncIterator[ChatCompletionsModel]:
    async with ChatCompletionsModel("smollm2", base_url=llama.base_url, api_key=llama.api_key) as lean:
        yield lean


def _ask(text: str) -> list[ModelMessage]:
    return [ModelRequest(parts=[UserPromptPart(text)])]


async def _stream(
    model: ChatCompletionsModel, messages: list[ModelMessage], settings: ModelSettings, *tools: ToolDefinition
) -> tuple[list[Any], ModelResponse]:
    params = ModelRequestParameters(function_tools=list(tools), allow_text_output=True)
    async with model.request_stream(messages, settings, params) as stream:
        events = [event async for event in stream]
    return events, stream.get()


async def test_a_reply_streams_token_by_token_with_usage(model: ChatCompletionsModel) -> None:
    events, response = await _stream(model, _ask("Say hello."), ModelSettings(max_tokens=24, temperature=0))
    (part,) = response.parts
    assert isinstance(part, TextPart) and part.content.strip()
    assert sum(isinstance(e, PartDeltaEvent) for e in events) >= 2
    assert response.finish_reason in ("stop", "length")
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 24
    assert (response.provider_response_id or "").startswith("chatcmpl")
    assert "SmolLM2" in (response.model_name or "")  # llama.cpp answers with the model file's name


async def test_max_tokens_ends_with_finish_reason_length(model: ChatCompletionsModel) -> None:
    prompt = _ask("Tell me a long story about a dragon.")
    _, response = await _stream(model, prompt, ModelSettings(max_tokens=5, temperature=0))
    assert response.finish_reason == "length"
    assert response.usage.output_tokens == 5


async def test_a_wrong_key_is_a_401_with_the_servers_body(llama: LlamaServer) -> None:
    async with ChatCompletionsModel("smollm2", base_url=llama.base_url, api_key="wrong") as lean:
        with pytest.raises(ModelHTTPError) as caught:
            await _stream(lean, _ask("hi"), ModelSettings(max_tokens=4))
    assert caught.value.status_code == 401
    assert isinstance(caught.value.body, dict)


async def test_a_history_with_tool_calls_is_accepted(model: ChatCompletionsModel) -> None:
    history: list[ModelMessage] = [
        ModelRequest(parts=[UserPromptPart("What is the weather in Rome?")]),
        ModelResponse(parts=[ToolCallPart("weather", {"city": "Rome"}, tool_call_id="call_1")]),
        ModelRequest(parts=[ToolReturnPart("weather", "sunny", tool_call_id="call_1")]),
        ModelResponse(parts=[TextPart("It is sunny in Rome.")]),
        ModelRequest(parts=[UserPromptPart("And is it warm?")]),
    ]
    _, response = await _stream(model, history, ModelSettings(max_tokens=16, temperature=0), WEATHER)
    assert response.parts and all(isinstance(p, TextPart | ToolCallPart) for p in response.parts)
    assert response.usage.input_tokens > 20  # The whole history reached the prompt.


async def test_an_agent_with_a_tool_runs_against_llama_cpp(model: ChatCompletionsModel) -> None:
    agent = Agent(model, instructions="You are a helpful assistant. Answer in one sentence.")

    @agent.tool_plain
    def weather(city: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """The weather in a city."""
        return f"sunny in {city}"

    async with agent.run_stream("Hello!", model_settings=ModelSettings(max_tokens=24, temperature=0)) as run:
        text = [chunk async for chunk in run.stream_text(delta=True)]
    assert "".join(text).strip()
    assert len(text) >= 2


async def test_cancelling_mid_stream_leaves_the_server_usable(model: ChatCompletionsModel) -> None:
    started = asyncio.Event()

    async def long_reply() -> None:
        params = ModelRequestParameters(allow_text_output=True)
        settings = ModelSettings(max_tokens=400, temperature=0)
        async with model.request_stream(_ask("Tell me a long story."), settings, params) as stream:
            async for _ in stream:
                started.set()

    task = asyncio.create_task(long_reply())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # With one slot, this waits for the cancelled generation unless llama.cpp saw the hang-up.
    _, response = await _stream(model, _ask("Say hi."), ModelSettings(max_tokens=4, temperature=0))
    assert response.usage.output_tokens > 0
