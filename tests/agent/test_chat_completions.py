"""The lean Chat Completions model against the local fake server, over loopback."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic_ai import Agent, ModelAPIError, ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ThinkingPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import ModelRequestParameters, override_allow_model_requests
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import ToolDefinition

from layercode_agent.agent.chat_completions import (
    DIRECT_TEXT,
    EARLY_REQUEST,
    ChatCompletionsModel,
    MessageCache,
    map_messages,
)
from tests.fakes.net import free_port
from tests.fakes.openai_server import FakeOpenAI, Reply

pytestmark = pytest.mark.anyio

WEATHER = ToolDefinition(
    name="weather",
    description="The weather in a city.",
    parameters_json_schema={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture(autouse=True)
def _allow_requests() -> Iterator[None]:  # pyright: ignore[reportUnusedFunction]
    """The suite forbids model requests; these go to a local fake."""
    with override_allow_model_requests(True):
        yield


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def model(fake: FakeOpenAI) -> AsyncIterator[ChatCompletionsModel]:
    async with ChatCompletionsModel("fake-model", base_url=fake.base_url, api_key="sk-test") as lean:
        yield lean


def _params(*tools: ToolDefinition, allow_text: bool = True) -> ModelRequestParameters:
    return ModelRequestParameters(function_tools=list(tools), allow_text_output=allow_text)


def _ask(text: str = "hi") -> list[ModelMessage]:
    return [ModelRequest(parts=[UserPromptPart(text)])]


async def _stream(
    model: ChatCompletionsModel,
    params: ModelRequestParameters | None = None,
    settings: ModelSettings | None = None,
    messages: list[ModelMessage] | None = None,
) -> tuple[list[Any], ModelResponse]:
    events: list[Any] = []
    async with model.request_stream(messages or _ask(), settings, params or _params()) as stream:
        async for event in stream:
            events.append(event)
    return events, stream.get()


async def test_text_streams_in_order_with_usage_and_finish_reason(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    fake.script(Reply(tokens=["Hel", "lo", " there", "!"], usage=(12, 4)))
    events, response = await _stream(model)
    deltas = [
        e.delta.content_delta for e in events if isinstance(e, PartDeltaEvent) and isinstance(e.delta, TextPartDelta)
    ]
    assert response.parts == [TextPart(content="Hello there!")]
    assert deltas == ["lo", " there", "!"]  # The first token opens the part.
    assert response.usage.input_tokens == 12 and response.usage.output_tokens == 4
    assert response.finish_reason == "stop"
    assert response.model_name == "fake-model" and response.provider_response_id == "chatcmpl-fake"
    sent = fake.received[0]
    assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}
    assert sent.headers["authorization"] == "Bearer sk-test"


async def test_streams_read_to_their_end_keep_one_connection(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    # A stream closed at `[DONE]`, before its body's last chunk, would drop the connection: a new TCP (and, to a
    # cloud LLM, TLS) handshake before every turn.
    for _ in range(3):
        _, response = await _stream(model)
        assert response.parts
    peers = {received.peer for received in fake.received}
    assert len(fake.received) == 3 and len(peers) == 1 and None not in peers


async def test_finish_reason_length_is_mapped(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    fake.script(Reply(tokens=["cut"], finish="length"))
    _, response = await _stream(model)
    assert response.finish_reason == "length"


async def test_several_tool_calls_with_arguments_in_pieces(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    calls = [("weather", {"city": "Paris, France"}), ("weather", {"city": "Lima"})]
    fake.script(Reply(tool_calls=calls, arg_piece=3, usage=(30, 20)))
    events, response = await _stream(model, _params(WEATHER))
    assert [type(p) for p in response.parts] == [ToolCallPart, ToolCallPart]
    first, second = response.parts
    assert isinstance(first, ToolCallPart) and isinstance(second, ToolCallPart)
    assert first.args_as_dict() == {"city": "Paris, France"} and first.tool_call_id == "call_1"
    assert second.args_as_dict() == {"city": "Lima"} and second.tool_call_id == "call_2"
    assert sum(isinstance(e, PartDeltaEvent) for e in events) >= 8  # The arguments came in pieces.
    assert response.finish_reason == "tool_call"
    assert response.usage.output_tokens == 20
    (tool,) = fake.received[0].body["tools"]
    assert tool["type"] == "function"
    assert tool["function"]["name"] == "weather" and tool["function"]["description"] == "The weather in a city."
    assert tool["function"]["parameters"]["properties"] == {"city": {"type": "string"}}
    # OpenAI's profile makes this schema strict, as it does for pydantic-ai's own model.
    assert tool["function"]["strict"] is True
    assert fake.received[0].body["tool_choice"] == "auto"


async def test_tool_choice_required_when_text_output_is_not_allowed(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    fake.script(Reply(tool_calls=[("weather", {"city": "Oslo"})]))
    await _stream(model, _params(WEATHER, allow_text=False))
    assert fake.received[0].body["tool_choice"] == "required"


async def test_settings_reach_the_body_and_headers(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    settings = ModelSettings(
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        stop_sequences=["END"],
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.3,
        extra_body={"top_k": 5},
        extra_headers={"x-trace": "abc"},
        timeout=20.0,
    )
    await _stream(model, settings=settings)
    sent = fake.received[0]
    body = sent.body
    assert (body["max_completion_tokens"], body["temperature"], body["top_p"], body["stop"], body["seed"]) == (
        50,
        0.2,
        0.9,
        ["END"],
        7,
    )
    assert (body["presence_penalty"], body["frequency_penalty"], body["top_k"]) == (0.1, 0.3, 5)
    assert "tools" not in body
    assert sent.headers["x-trace"] == "abc"


async def test_sse_framing_split_events_crlf_and_comments(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    def chunk(text: str) -> str:
        return json.dumps({"id": "x", "model": "m", "choices": [{"index": 0, "delta": {"content": text}}]})

    stream = (
        f": keep-alive\r\n\r\ndata: {chunk('one')}\r\n\r\n"
        f"event: message\ndata: {chunk(' two')}\n\ndata: {chunk(' three')}\n\ndata: [DONE]\n\n"
    )
    raw = stream.encode()
    fake.script(Reply(raw=[raw[i : i + 7] for i in range(0, len(raw), 7)]))
    _, response = await _stream(model)
    assert response.parts == [TextPart(content="one two three")]
    assert response.finish_reason == "stop"  # The server sent none.


async def test_500_is_retried_once_then_raises_with_status_and_body(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    fake.script(Reply(status=500), Reply(status=503), Reply())
    with pytest.raises(ModelHTTPError) as caught:
        await _stream(model)
    assert caught.value.status_code == 503
    assert caught.value.model_name == "fake-model"
    assert caught.value.body == {"message": "scripted error 503", "type": "invalid_request_error", "code": None}
    assert len(fake.received) == 2


async def test_500_then_success_costs_one_retry(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    fake.script(Reply(status=500), Reply(tokens=["fine"]))
    _, response = await _stream(model)
    assert response.parts == [TextPart(content="fine")]
    assert len(fake.received) == 2


async def test_max_retries_0_makes_one_attempt(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    fake.script(Reply(status=500), Reply())
    with pytest.raises(ModelHTTPError):
        await _stream(model, settings=ModelSettings(max_retries=0))
    assert len(fake.received) == 1


async def test_400_is_not_retried(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    fake.script(Reply(status=400), Reply())
    with pytest.raises(ModelHTTPError) as caught:
        await _stream(model)
    assert caught.value.status_code == 400
    assert len(fake.received) == 1


async def test_connection_refused_is_a_model_api_error() -> None:
    async with ChatCompletionsModel("m", base_url=f"http://127.0.0.1:{free_port()}/v1") as lean:
        with pytest.raises(ModelAPIError):
            await _stream(lean)


async def test_malformed_chunk_is_a_model_api_error(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    fake.script(Reply(fail="malformed"))
    with pytest.raises(ModelAPIError):
        await _stream(model)


async def test_error_inside_the_stream_is_a_model_api_error(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    error = json.dumps({"error": {"message": "overloaded", "type": "server_error", "code": "server_error"}})
    fake.script(Reply(raw=[f"data: {error}\n\n".encode()]))
    with pytest.raises(ModelHTTPError) as caught:
        await _stream(model)
    assert caught.value.status_code == 500


@pytest.mark.parametrize("direct", [False, True], ids=["events", "direct"])
async def test_cancelling_mid_stream_closes_the_connection(
    model: ChatCompletionsModel, fake: FakeOpenAI, direct: bool
) -> None:
    fake.script(Reply(tokens=["word"] * 200, token_delay=0.02))
    first = asyncio.Event()
    handed: list[str] = []

    def hand(text: str) -> None:
        handed.append(text)
        first.set()

    async def consume() -> None:
        if direct:
            DIRECT_TEXT.set(hand)  # This task's own context.
        async with model.request_stream(_ask(), None, _params()) as stream:
            async for _ in stream:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(fake.received[0].hung_up.wait, 10)
    assert fake.received[0].tokens_sent < 200
    count = len(handed)
    await asyncio.sleep(0.1)
    assert len(handed) == count and (count > 0) == direct  # Nothing is handed on after the cancellation.


def _history(exchanges: int) -> list[ModelMessage]:
    messages: list[ModelMessage] = []
    for n in range(exchanges):
        messages.append(ModelRequest(parts=[UserPromptPart(f"question {n}")]))
        messages.append(ModelResponse(parts=[ToolCallPart("weather", {"city": f"c{n}"}, tool_call_id=f"t{n}")]))
        messages.append(ModelRequest(parts=[ToolReturnPart("weather", f"sunny {n}", tool_call_id=f"t{n}")]))
        messages.append(ModelResponse(parts=[TextPart(f"answer {n}")]))
    return messages


def test_messages_map_to_chat_completions_dicts() -> None:
    mapped = map_messages(_history(1), ["Be brief."])
    assert mapped == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "question 0"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "t0", "type": "function", "function": {"name": "weather", "arguments": '{"city":"c0"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "t0", "content": "sunny 0"},
        {"role": "assistant", "content": "answer 0"},
    ]


async def test_request_body_for_a_history_with_tool_calls(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    await _stream(model, messages=[*_history(2), ModelRequest(parts=[UserPromptPart("and now?")])])
    messages = fake.received[0].messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"] * 2 + ["user"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city":"c0"}'
    assert messages[6]["tool_call_id"] == "t1" and messages[-1]["content"] == "and now?"


async def test_an_agent_with_a_tool_runs_end_to_end(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    fake.script(
        Reply(tool_calls=[("weather", {"city": "Paris"})], arg_piece=2, usage=(20, 5)),
        Reply(tokens=["It", " is", " sunny", " in", " Paris", "."], usage=(40, 6)),
    )
    agent = Agent(model, instructions="You answer about the weather.")

    @agent.tool_plain
    def weather(city: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """The weather in a city."""
        return f"sunny in {city}"

    async with agent.run_stream("Weather in Paris?") as run:
        text = [chunk async for chunk in run.stream_text(delta=True)]
    assert "".join(text) == "It is sunny in Paris."
    assert run.usage.input_tokens == 60 and run.usage.output_tokens == 11
    second = fake.received[1].messages
    assert second[0] == {"role": "system", "content": "You answer about the weather."}
    assert second[-1] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny in Paris"}
    function = second[-2]["tool_calls"][0]["function"]
    assert function["name"] == "weather" and json.loads(function["arguments"]) == {"city": "Paris"}


def test_building_the_body_for_40_exchanges() -> None:
    """Correctness at size; the speed figure is printed by the bench, never asserted."""
    lean = ChatCompletionsModel("m", base_url="http://127.0.0.1:1/v1")
    body = lean.build_body(_history(40), ModelSettings(), _params(WEATHER))
    assert len(body["messages"]) == 160
    assert isinstance(body["messages"][-1], dict)


def test_the_message_cache_maps_each_message_once_and_forgets_it_with_the_message() -> None:
    cache = MessageCache()
    history = _history(2)
    first = map_messages(history, cache=cache)
    assert map_messages(history, cache=cache) == first == map_messages(history)
    assert cache.get(history[0]) is cache.get(history[0])
    assert len(cache) == len(history)
    reply = history[3]
    assert isinstance(reply, ModelResponse)
    reply.parts = [TextPart("changed")]
    assert cache.get(reply) == [{"role": "assistant", "content": "changed"}]
    del history, reply, first
    gc.collect()
    assert len(cache) == 0


@contextmanager
def _handed_directly() -> Generator[list[str]]:
    """The text deltas a stream hands to `DIRECT_TEXT` while the block runs."""
    direct: list[str] = []
    reset = DIRECT_TEXT.set(direct.append)
    try:
        yield direct
    finally:
        DIRECT_TEXT.reset(reset)


def _sse(*chunks: dict[str, Any]) -> list[bytes]:
    return [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks] + [b"data: [DONE]\n\n"]


def _text_chunk(text: str) -> dict[str, Any]:
    return {"id": "c", "model": "fake-model", "choices": [{"index": 0, "delta": {"content": text}}]}


def _call_chunk(name: str | None, args: str, call_id: str | None = None) -> dict[str, Any]:
    call = {"index": 0, "id": call_id, "function": {"name": name, "arguments": args}}
    return {"id": "c", "model": "fake-model", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}


async def test_direct_text_gets_each_delta_and_the_agent_the_whole_text(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    fake.script(Reply(tokens=["Hel", "lo", " there", "!"], usage=(12, 4)))
    with _handed_directly() as direct:
        events, response = await _stream(model)
    assert direct == ["Hel", "lo", " there", "!"]  # Each delta, at once, in order.
    assert response.parts == [TextPart(content="Hello there!")]  # The agent's record is the same.
    starts = [e for e in events if isinstance(e, PartStartEvent)]
    assert [s.part for s in starts] == [TextPart(content="Hello there!")]  # One event, not one per token.
    assert not any(isinstance(e, PartDeltaEvent) for e in events)
    assert response.usage.output_tokens == 4 and response.finish_reason == "stop"


async def test_direct_text_before_a_tool_call_reaches_the_agent_before_the_call(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    fake.script(
        Reply(
            raw=_sse(
                _text_chunk("Let me"),
                _text_chunk(" check."),
                _call_chunk("weather", '{"ci', "call_9"),
                _call_chunk(None, 'ty": "Rome"}'),
            )
        )
    )
    with _handed_directly() as direct:
        events, response = await _stream(model, _params(WEATHER))
    assert direct == ["Let me", " check."]
    first, second = response.parts
    assert first == TextPart(content="Let me check.")
    assert isinstance(second, ToolCallPart) and second.args_as_dict() == {"city": "Rome"}
    kinds = [type(e.part).__name__ for e in events if isinstance(e, PartStartEvent)]
    assert kinds == ["TextPart", "ToolCallPart"]  # The text part ends before the call starts.


async def test_a_whole_response_request_never_hands_text_to_direct(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    fake.script(Reply(tokens=["not", " spoken"]))
    with _handed_directly() as direct:
        response = await model.request(_ask(), None, _params())
    assert response.parts == [TextPart(content="not spoken")]
    assert direct == []


async def test_an_error_inside_a_direct_stream_is_a_model_api_error(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    fake.script(Reply(raw=[f"data: {json.dumps(_text_chunk('Hi'))}\n\n".encode(), b"data: {not json\n\n"]))
    with _handed_directly() as direct:
        with pytest.raises(ModelAPIError, match="not JSON"):
            await _stream(model)
    assert direct == ["Hi"]


async def test_embedded_thinking_is_never_handed_to_direct(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    fake.script(Reply(tokens=["<think>", "plan", " it", "</think>", "Sure", "."]))
    with _handed_directly() as direct:
        _, response = await _stream(model)
    assert direct == ["Sure", "."]
    thinking, text = response.parts
    assert isinstance(thinking, ThinkingPart) and thinking.content == "plan it"
    assert text == TextPart(content="Sure.")


# --- The early request: sent while the agent sets its run up, taken only if it is the agent's own -------

HELLO = "".join(Reply().tokens)


async def _agent_turn(
    model: ChatCompletionsModel, agent: Agent[None, str], messages: list[ModelMessage], *, early: bool = True
) -> str:
    """One turn as the runner makes it: the early request first (if asked), then the agent's run."""
    handle = await model.open_early(messages) if early else None
    token = EARLY_REQUEST.set(handle)
    try:
        result = await agent.run(message_history=messages)
    finally:
        EARLY_REQUEST.reset(token)
        if handle is not None:
            handle.discard()
    return result.output


def _turns(count: int) -> list[ModelMessage]:
    history: list[ModelMessage] = []
    for index in range(count):
        history.append(ModelRequest(parts=[UserPromptPart(f"question {index}")]))
        history.append(ModelResponse(parts=[TextPart(f"answer {index}")]))
    return [*history, ModelRequest(parts=[UserPromptPart("and now?")])]


async def test_the_early_request_is_the_turns_only_request_when_it_is_the_agents_own(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    agent = Agent(model, instructions="Be brief.")
    blank = await model.open_early(_turns(0))
    assert blank is not None and blank.task is None  # No turn yet to make it like: nothing sent.
    blank.discard()
    assert await _agent_turn(model, agent, _turns(0)) == HELLO
    first = fake.received[-1]

    assert await _agent_turn(model, agent, _turns(1)) == HELLO

    assert len(fake.received) == 2  # The early request was the turn's request: nothing sent twice.
    second = fake.received[1]
    assert second.messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in second.messages[1:]] == ["question 0", "answer 0", "and now?"]
    assert {key: value for key, value in second.body.items() if key != "messages"} == {
        key: value for key, value in first.body.items() if key != "messages"
    }
    assert second.completed and not second.hung_up.is_set()


async def test_an_early_request_that_is_not_the_agents_is_closed_and_never_answers(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    await _agent_turn(model, Agent(model, instructions="Be brief."), _turns(0))
    other = Agent(model, instructions="Answer in French.")  # Other instructions: another body.
    # The early request (last turn's instructions) would take seconds: only a closed one ends before.
    fake.responder = lambda received: Reply(
        first_token_delay=5.0 if received.messages[0]["content"] == "Be brief." else 0.0
    )

    assert await _agent_turn(model, other, _turns(1)) == HELLO

    # Closed as soon as the agent's own request differed: the fake may not even have read it, and
    # if it did, it never streamed it to its end.
    early = [received for received in fake.received[1:] if received.messages[0]["content"] == "Be brief."]
    real = [received for received in fake.received[1:] if received.messages[0]["content"] == "Answer in French."]
    assert len(real) == 1 and real[0].completed
    assert all(received.hung_up.wait(10) and not received.completed for received in early)


async def test_after_misses_in_a_row_no_early_request_is_sent(model: ChatCompletionsModel, fake: FakeOpenAI) -> None:
    for index in range(4):
        # Instructions that change every turn: no early request can ever be the agent's own.
        await _agent_turn(model, Agent(model, instructions=f"Turn {index}."), _turns(index))
    # Turn 0 had nothing to go by; turns 1 to 3 missed: no more early requests.
    assert await model.open_early(_turns(4)) is None
    assert await _agent_turn(model, Agent(model, instructions="Be brief."), _turns(4)) == HELLO
    assert fake.received[-1].messages[0]["content"] == "Be brief." and fake.received[-1].completed


async def test_an_early_request_that_fails_counts_as_the_first_attempt(
    model: ChatCompletionsModel, fake: FakeOpenAI
) -> None:
    agent = Agent(model, instructions="Be brief.")
    await _agent_turn(model, agent, _turns(0))
    fake.script(Reply(fail="http500"), Reply(tokens=["Second", " try"]))

    assert await _agent_turn(model, agent, _turns(1)) == "Second try"
    assert len(fake.received) == 3  # The early request (500), then the one retry; no third attempt.


async def test_the_proxy_the_environment_names_carries_the_requests(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake LLM plays the proxy: a request for a host nobody can resolve reaches it, in absolute form.
    monkeypatch.setenv("HTTP_PROXY", fake.base_url.rsplit("/v1", 1)[0])
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with ChatCompletionsModel("fake-model", base_url="http://llm.invalid/v1", api_key="sk-test") as proxied:
        for _ in range(2):  # Read once, used for every request.
            _, response = await _stream(proxied)
            assert response.parts
    assert len(fake.received) == 2
    assert {received.headers["host"] for received in fake.received} == {"llm.invalid"}


async def test_no_proxy_excludes_a_host_from_the_environments_proxy(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # Nothing listens there.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with ChatCompletionsModel("fake-model", base_url=fake.base_url, api_key="sk-test") as direct:
        _, response = await _stream(direct)
    assert response.parts and len(fake.received) == 1
