"""The turn record, run through `TurnRunner` itself against real stores (memory and SQLite).

A closed response generator is exactly what the server sees when Layercode aborts a request, so
barge-ins are simulated by closing the stream; two runners on one SQLite file are two workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord
from pydantic_ai.messages import (
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartEndEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ToolCallPart,
    ToolCallPartDelta,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.usage import UsageLimits

from layercode_agent.agent import APOLOGY, TOOL_FILLER, build_agent
from layercode_agent.history import turn_meta
from layercode_agent.protocol import (
    DataEvent,
    DataResponse,
    EndResponse,
    MessageEvent,
    OutboundEvent,
    SessionEndEvent,
    SessionStartEvent,
    TTSResponse,
)
from layercode_agent.stores import AgentStore, MemoryStore, SQLiteStore, StoreUnavailableError
from layercode_agent.turns import Stage, TurnObserver, TurnReport, TurnRunner, TurnTiming
from layercode_agent.turns.adapter import ReplyAdapter
from layercode_agent.turns.state import Phase, Turn

from .fakes.history import said

pytestmark = pytest.mark.anyio

Stream = Callable[[list[ModelMessage], AgentInfo], AsyncIterator[str | DeltaToolCalls]]


def statuses(messages: list[ModelMessage]) -> list[tuple[str | None, str | None, str | None]]:
    return [
        ((m.metadata or {}).get("turn_id"), (m.metadata or {}).get("role"), (m.metadata or {}).get("status"))
        for m in messages
    ]


class Model:
    """A scripted streaming model that records what it was sent."""

    def __init__(self, *replies: list[str], delay: float = 0.0) -> None:
        self.replies = list(replies)
        self.delay = delay
        self.calls: list[list[tuple[str, str]]] = []
        self.tokens_sent = 0

    async def stream(self, messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        self.calls.append(said(messages))
        tokens = self.replies.pop(0) if self.replies else ["Okay."]
        for token in tokens:
            if self.delay:
                await asyncio.sleep(self.delay)
            self.tokens_sent += 1
            yield token


def make_runner(store: AgentStore, stream: Stream, **kwargs: Any) -> TurnRunner:
    kwargs.setdefault("poll_interval", 0.02)
    return TurnRunner(agent=build_agent(model=FunctionModel(stream_function=stream)), store=store, **kwargs)


def message(text: str, turn_id: str, conversation_id: str = "conv", **fields: Any) -> MessageEvent:
    return MessageEvent(conversation_id=conversation_id, session_id="sess", turn_id=turn_id, text=text, **fields)


async def collect(events: AsyncIterator[OutboundEvent]) -> list[OutboundEvent]:
    return [event async for event in events]


def spoken(events: list[OutboundEvent]) -> str:
    return "".join(getattr(event, "content", "") for event in events if event.type == "response.tts")


async def read_then_hang_up(events: AsyncGenerator[OutboundEvent], count: int) -> str:
    """Read `count` tts events, then close the stream the way an aborted request does."""
    text = ""
    got = 0
    async for event in events:
        if event.type == "response.tts":
            text += getattr(event, "content", "")
            got += 1
            if got == count:
                break
    await events.aclose()
    return text


class Listener:
    """Reads a stream in the background, as a connected caller; `spoke` is set after `after` tts events."""

    def __init__(self, events: AsyncIterator[OutboundEvent], *, after: int) -> None:
        self.spoke = asyncio.Event()
        self.task = asyncio.create_task(self._read(events, after))

    async def _read(self, events: AsyncIterator[OutboundEvent], after: int) -> list[OutboundEvent]:
        received: list[OutboundEvent] = []
        async for event in events:
            received.append(event)
            if sum(item.type == "response.tts" for item in received) >= after:
                self.spoke.set()
        return received


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AgentStore]:
    backend: AgentStore = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "c.db")
    async with backend:
        yield backend


async def history(store: AgentStore, conversation_id: str = "conv") -> list[ModelMessage]:
    conversation = await store.load(conversation_id)
    return conversation.messages if conversation else []


async def settled(runner: TurnRunner) -> None:
    """Wait until every turn task of the runner has finished (its close is written)."""
    for _ in range(500):
        if not runner._tasks:  # pyright: ignore[reportPrivateUsage]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("turns did not finish")


# --- Turn record ------------------------------------------------------------------------------------


async def test_a_placeholder_is_stored_before_the_model_is_asked(store: AgentStore) -> None:
    during: list[list[tuple[str | None, str | None, str | None]]] = []

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        during.append(statuses(await history(store)))
        assert said(messages) == [("user", "hi")]  # The placeholder never reaches the model.
        yield "Hello."

    runner = make_runner(store, stream)
    events = await collect(runner.stream_message(message("hi", "t1"), delivery="d1"))

    assert spoken(events) == "Hello."
    assert [event.type for event in events][-1] == "response.end"
    assert during == [[("t1", "user", None), ("t1", "assistant", "pending")]]
    stored = await history(store)
    assert statuses(stored) == [("t1", "user", None), ("t1", "assistant", "completed")]
    assert said(stored) == [("user", "hi"), ("assistant", "Hello.")]


async def test_a_barge_in_keeps_what_was_sent_and_the_next_turn_hears_what_the_caller_heard(
    store: AgentStore,
) -> None:
    model = Model([f" w{index}" for index in range(100)], ["Sure."], delay=0.01)
    runner = make_runner(store, model.stream)

    sent = await read_then_hang_up(runner.stream_message(message("tell me a story", "t1")), 5)
    await settled(runner)

    assert sent == "w0 w1 w2 w3 w4"
    assert model.tokens_sent < 30, "the model stream must be cancelled when the caller hangs up"
    stored = await history(store)
    assert statuses(stored)[-1] == ("t1", "assistant", "interrupted")
    assert said(stored)[-1][1].startswith(sent)  # What was sent, perhaps a token more in flight.

    heard = {"previous_turn_interrupted": True, "words_heard": 2, "text_heard": "w0 w1", "assistant_turn_id": "t1"}
    events = await collect(runner.stream_message(message("wait, stop", "t2", interruption_context=heard)))

    assert spoken(events) == "Sure."
    assert model.calls[-1] == [
        ("user", "tell me a story"),
        ("assistant", "w0 w1 [interrupted]"),
        ("user", "wait, stop"),
    ]
    stored = await history(store)
    assert said(stored) == [
        ("user", "tell me a story"),
        ("assistant", "w0 w1"),
        ("user", "wait, stop"),
        ("assistant", "Sure."),
    ]
    reply = stored[1].metadata or {}
    assert reply["status"] == "interrupted"
    assert reply["text_heard"] == "w0 w1"
    assert str(reply["text_sent"]).startswith(sent)


async def test_interruption_context_rewrites_a_reply_that_had_completed(store: AgentStore) -> None:
    # The whole reply was sent, but the caller talked over its playback.
    model = Model(["One, two, three, four."], ["Okay."])
    runner = make_runner(store, model.stream)
    await collect(runner.stream_message(message("count", "t1")))

    heard = {"previous_turn_interrupted": True, "text_heard": "One, two,", "assistant_turn_id": "t1"}
    await collect(runner.stream_message(message("enough", "t2", interruption_context=heard)))

    assert model.calls[-1][1] == ("assistant", "One, two, [interrupted]")
    stored = await history(store)
    assert (stored[1].metadata or {})["text_sent"] == "One, two, three, four."
    assert statuses(stored)[1] == ("t1", "assistant", "interrupted")


async def test_interruption_context_for_another_turn_changes_nothing(store: AgentStore) -> None:
    model = Model(["All of it."], ["Okay."])
    runner = make_runner(store, model.stream)
    await collect(runner.stream_message(message("say it", "t1")))

    heard = {"previous_turn_interrupted": True, "text_heard": "All", "assistant_turn_id": "some-other-turn"}
    await collect(runner.stream_message(message("next", "t2", interruption_context=heard)))

    assert model.calls[-1][1] == ("assistant", "All of it.")


async def test_an_aborted_tool_never_finishes_and_leaves_no_dangling_call(store: AgentStore) -> None:
    finished: list[str] = []
    started = asyncio.Event()

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if not any(isinstance(part, ToolReturnPart) for m in messages for part in m.parts):
            yield {0: DeltaToolCall(name="slow_lookup", json_args='{"city": "Paris"}', tool_call_id="call-1")}
            return
        yield "It is sunny."

    agent = build_agent(model=FunctionModel(stream_function=stream))

    @agent.tool_plain
    async def slow_lookup(city: str) -> str:  # pyright: ignore[reportUnusedFunction]
        started.set()
        await asyncio.sleep(1.0)
        finished.append(city)
        return "sunny"

    runner = TurnRunner(agent=agent, store=store, poll_interval=0.02)
    events = runner.stream_message(message("weather?", "t1"))
    types: list[str] = []
    async for event in events:
        types.append(event.type)
        if event.type == "response.data":
            break  # The tool is running: hang up.
    await started.wait()
    await events.aclose()
    await settled(runner)
    await asyncio.sleep(1.2)

    assert finished == [], "a tool of an aborted turn must not run on"
    stored = await history(store)
    assert not any(isinstance(part, ToolCallPart | ToolReturnPart) for m in stored for part in m.parts)
    assert statuses(stored)[-1] == ("t1", "assistant", "interrupted")


async def test_an_interrupted_turn_keeps_the_tool_calls_that_finished(store: AgentStore) -> None:
    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if not any(isinstance(part, ToolReturnPart) for m in messages for part in m.parts):
            yield {0: DeltaToolCall(name="lookup", json_args='{"city": "Paris"}', tool_call_id="call-1")}
            return
        for index in range(200):
            await asyncio.sleep(0.01)
            yield f" w{index}"

    agent = build_agent(model=FunctionModel(stream_function=stream))

    @agent.tool_plain
    def lookup(city: str) -> str:  # pyright: ignore[reportUnusedFunction]
        return f"sunny in {city}"

    runner = TurnRunner(agent=agent, store=store, poll_interval=0.02)
    await read_then_hang_up(runner.stream_message(message("weather?", "t1")), 3)
    await settled(runner)

    stored = await history(store)
    kinds = [type(part).__name__ for m in stored for part in m.parts]
    assert kinds == ["UserPromptPart", "ToolCallPart", "ToolReturnPart", "TextPart"]
    assert statuses(stored) == [
        ("t1", "user", None),
        ("t1", "tool", None),
        ("t1", "tool", None),
        ("t1", "assistant", "interrupted"),
    ]


async def test_a_failing_model_gets_an_apology_stored_as_failed(store: AgentStore) -> None:
    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield "Let me"
        raise RuntimeError("boom")

    runner = make_runner(store, stream)
    events = await collect(runner.stream_message(message("hi", "t1")))

    assert spoken(events).startswith("Let me Sorry")
    assert [event.type for event in events].count("response.end") == 1
    assert statuses(await history(store))[-1] == ("t1", "assistant", "failed")


# --- Duplicates -------------------------------------------------------------------------------------


async def test_a_repeated_delivery_gets_the_stored_reply_without_a_second_llm_call(store: AgentStore) -> None:
    model = Model(["**The** answer."], ["Should never be said."])
    runner = make_runner(store, model.stream)

    first = await collect(runner.stream_message(message("question", "t1"), delivery="d1"))
    second = await collect(runner.stream_message(message("question", "t1"), delivery="d1"))

    assert len(model.calls) == 1
    assert spoken(first) == spoken(second) == "The answer."
    assert second[-1].type == "response.end"
    assert said(await history(store)) == [("user", "question"), ("assistant", "**The** answer.")]


async def test_a_repeat_while_the_first_delivery_streams_waits_for_its_reply(store: AgentStore) -> None:
    model = Model(["One", " two", " three."], delay=0.05)
    runner = make_runner(store, model.stream)

    first, second = await asyncio.gather(
        collect(runner.stream_message(message("count", "t1"), delivery="d1")),
        collect(runner.stream_message(message("count", "t1"), delivery="d1")),
    )

    assert len(model.calls) == 1
    assert spoken(first) == spoken(second) == "One two three."
    assert said(await history(store)) == [("user", "count"), ("assistant", "One two three.")]


async def test_the_same_body_without_a_turn_id_is_recognised_by_its_digest(store: AgentStore) -> None:
    model = Model(["Once."], ["Twice."])
    runner = make_runner(store, model.stream)
    event = MessageEvent(conversation_id="conv", session_id="sess", text="hi")

    await collect(runner.stream_message(event, delivery="digest-1"))
    await collect(runner.stream_message(event, delivery="digest-1"))

    assert len(model.calls) == 1


async def test_a_repeated_welcome_is_spoken_but_stored_once(store: AgentStore) -> None:
    runner = make_runner(store, Model().stream, welcome_message="Welcome!")
    start = SessionStartEvent(conversation_id="conv", session_id="sess", turn_id="w1")

    first = await collect(runner.sessions.stream_session_start(start))
    second = await collect(runner.sessions.stream_session_start(start))

    assert spoken(first) == spoken(second) == "Welcome!"
    assert said(await history(store)) == [("assistant", "Welcome!")]


async def test_a_repeated_data_delivery_runs_the_handler_once(store: AgentStore) -> None:
    calls: list[object] = []

    async def handler(event: DataEvent) -> Any:
        calls.append(event.data)
        await asyncio.sleep(0.05)
        return {"count": len(calls)}

    runner = make_runner(store, Model().stream, data_handler=handler)
    event = DataEvent(conversation_id="conv", turn_id="t1", data={"button": "yes"})

    replies = await asyncio.gather(*(runner.sessions.handle_data(event, delivery="d1") for _ in range(3)))
    later = await runner.sessions.handle_data(event, delivery="d1")
    other = await runner.sessions.handle_data(event, delivery="d2")

    assert calls == [{"button": "yes"}, {"button": "yes"}]
    assert [reply.content for reply in replies] == [{"count": 1}] * 3
    assert later.content == {"count": 1}
    assert other.content == {"count": 2}


async def test_a_failing_data_handler_lets_a_retry_run_it_again(store: AgentStore) -> None:
    attempts: list[int] = []

    async def handler(event: DataEvent) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first try fails")
        return "ok"

    runner = make_runner(store, Model().stream, data_handler=handler)
    event = DataEvent(conversation_id="conv", turn_id="t1", data={})
    with pytest.raises(RuntimeError):
        await runner.sessions.handle_data(event, delivery="d1")

    assert (await runner.sessions.handle_data(event, delivery="d1")).content == "ok"


async def test_a_repeated_session_end_is_stored_once(store: AgentStore) -> None:
    runner = make_runner(store, Model().stream)
    end = SessionEndEvent(conversation_id="conv", session_id="sess", transcript=[])

    assert await runner.sessions.record_session_event(end, delivery="d1") is True
    assert await runner.sessions.record_session_event(end, delivery="d1") is False
    assert await runner.sessions.record_session_event(end, delivery="d2") is True

    assert [event.event_type for event in await store.session_events("conv")] == ["session.end", "session.end"]


# --- Latest turn wins ---------------------------------------------------------------------------------


async def test_a_new_turn_stops_the_one_still_streaming_and_goes_after_it(store: AgentStore) -> None:
    model = Model([f" w{index}" for index in range(200)], ["Second."], delay=0.01)
    runner = make_runner(store, model.stream)

    first = Listener(runner.stream_message(message("first", "t1")), after=1)
    await first.spoke.wait()
    second = await collect(runner.stream_message(message("second", "t2")))
    first_events = await asyncio.wait_for(first.task, 5)

    assert spoken(second) == "Second."
    assert first_events[-1].type == "response.end"
    assert model.tokens_sent < 150
    stored = await history(store)
    assert [turn for turn, *_ in statuses(stored)] == ["t1", "t1", "t2", "t2"]
    assert statuses(stored)[1] == ("t1", "assistant", "interrupted")
    assert said(stored)[1][1] == spoken(first_events)
    assert model.calls[-1][:1] == [("user", "first")] and model.calls[-1][-1] == ("user", "second")


async def test_many_turns_at_once_never_interleave(store: AgentStore) -> None:
    model = Model(*[[f"r{index}"] for index in range(10)], delay=0.005)
    runner = make_runner(store, model.stream)

    await asyncio.gather(*(collect(runner.stream_message(message(f"u{i}", f"t{i}"))) for i in range(10)))
    await settled(runner)

    stored = await history(store)
    roles = [role for _, role, _ in statuses(stored)]
    assert roles == ["user", "assistant"] * 10
    turns = [turn for turn, *_ in statuses(stored)]
    assert turns[0::2] == turns[1::2], "each reply follows its own user message"
    assert {status for *_, status in statuses(stored)} <= {None, "completed", "interrupted"}


# --- Several workers on one SQLite file ----------------------------------------------------------------


async def test_a_turn_on_another_worker_is_cancelled_and_closed_first(tmp_path: Path) -> None:
    model_a = Model([f" a{index}" for index in range(300)], delay=0.01)
    model_b = Model(["From B."])
    async with SQLiteStore(tmp_path / "c.db") as store_a, SQLiteStore(tmp_path / "c.db") as store_b:
        worker_a = make_runner(store_a, model_a.stream, owner="worker-a")
        worker_b = make_runner(store_b, model_b.stream, owner="worker-b")

        first = Listener(worker_a.stream_message(message("first", "t1")), after=3)
        await first.spoke.wait()
        second = await collect(worker_b.stream_message(message("second", "t2")))
        first_events = await asyncio.wait_for(first.task, 5)
        stored = await history(store_b)

    assert spoken(second) == "From B."
    assert first_events[-1].type == "response.end"
    assert model_a.tokens_sent < 200, "worker A's model stream must be cancelled"
    assert statuses(stored) == [
        ("t1", "user", None),
        ("t1", "assistant", "interrupted"),
        ("t2", "user", None),
        ("t2", "assistant", "completed"),
    ]
    assert said(stored)[1][1] == spoken(first_events)
    heard = f"{spoken(first_events).rstrip()} [interrupted]"
    assert model_b.calls == [[("user", "first"), ("assistant", heard), ("user", "second")]]


async def test_a_turn_whose_worker_died_is_taken_over_at_once(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "c.db") as store:
        # What a worker killed mid-stream leaves: the caller's words and its placeholder, no heartbeat.
        await store.save(
            _conversation(
                [
                    ModelRequest(parts=[UserPromptPart("first")], metadata=turn_meta("t1", "user")),
                    ModelResponse(parts=[], metadata=turn_meta("t1", "assistant", "pending", owner="dead-worker")),
                ]
            )
        )
        model = Model(["Back again."])
        runner = make_runner(store, model.stream, handover_timeout=10)
        heard = {"previous_turn_interrupted": True, "text_heard": "Hel", "assistant_turn_id": "t1"}

        loop = asyncio.get_running_loop()
        began = loop.time()
        events = await collect(runner.stream_message(message("hello?", "t2", interruption_context=heard)))
        took = loop.time() - began
        stored = await history(store)

    assert spoken(events) == "Back again."
    assert took < 5, "no heartbeat: the dead worker's turn is taken over without waiting out the timeout"
    assert statuses(stored) == [
        ("t1", "user", None),
        ("t1", "assistant", "lost"),
        ("t2", "user", None),
        ("t2", "assistant", "completed"),
    ]
    assert said(stored)[1] == ("assistant", "Hel")


async def test_a_silent_worker_with_a_heartbeat_is_waited_for_then_taken_over(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "c.db") as store:
        await store.save(
            _conversation(
                [
                    ModelRequest(parts=[UserPromptPart("first")], metadata=turn_meta("t1", "user")),
                    ModelResponse(parts=[], metadata=turn_meta("t1", "assistant", "pending", owner="hung-worker")),
                ]
            )
        )
        await store.set_marker("", "worker:hung-worker", "alive", ttl=30)
        runner = make_runner(store, Model(["Here."]).stream, handover_timeout=0.5)

        events = await collect(runner.stream_message(message("hello?", "t2")))
        asked = await store.get_markers([("conv", "cancel")])
        stored = await history(store)

    assert spoken(events) == "Here."
    assert asked == ["t1"], "the other worker was asked to cancel its turn"
    assert [status for *_, status in statuses(stored)] == [None, "lost", None, "completed"]
    assert said(stored) == [("user", "first"), ("user", "hello?"), ("assistant", "Here.")]


def _conversation(messages: list[ModelMessage]) -> Conversation:
    return Conversation(conversation_id="conv", messages=messages)


async def test_a_copied_interruption_mark_is_neither_spoken_nor_stored(store: AgentStore) -> None:
    model = Model(["Rome, and the capital of", " [interrupted]"])
    runner = make_runner(store, model.stream)

    events = await collect(runner.stream_message(message("capital of Italy?", "t1")))

    assert spoken(events).strip() == "Rome, and the capital of"
    assert said(await history(store))[-1] == ("assistant", "Rome, and the capital of")


# --- Observing turns, and the filler for slow models ------------------------------------------------


class Recorder(TurnObserver):
    def __init__(self) -> None:
        self.open = 0
        self.reports: list[TurnReport] = []
        self.operations: list[str] = []

    def stream_opened(self) -> None:
        self.open += 1

    def stream_closed(self) -> None:
        self.open -= 1

    def turn_finished(self, report: TurnReport) -> None:
        self.reports.append(report)

    def store_operation(self, operation: str, seconds: float) -> None:
        assert seconds >= 0
        self.operations.append(operation)


async def test_a_turn_reports_its_stages_in_order_once(store: AgentStore) -> None:
    recorder = Recorder()
    runner = make_runner(store, Model(["Hello", " there."], delay=0.01).stream, observer=recorder)

    await collect(runner.stream_message(message("hi", "t1")))
    await settled(runner)

    (report,) = recorder.reports
    assert report.outcome == "completed" and report.turn_id == "t1" and report.llm_error is None
    order = [
        "history_loaded",
        "llm_request",
        "llm_first_token",
        "first_tts",
        "llm_last_token",
        "history_saved",
        "response_end",
    ]
    assert list(report.stages) == order
    values = [report.stages[stage] for stage in order]
    assert values == sorted(values)
    assert recorder.open == 0
    assert recorder.operations == ["begin", "close"]


async def test_interrupted_and_failed_turns_are_reported_with_their_outcome(store: AgentStore) -> None:
    recorder = Recorder()
    model = Model([f" w{index}" for index in range(100)], delay=0.01)
    runner = make_runner(store, model.stream, observer=recorder)
    await read_then_hang_up(runner.stream_message(message("story", "t1")), 2)
    await settled(runner)

    async def broken(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        raise ConnectionError("LLM down")
        yield ""

    failing = make_runner(store, broken, observer=recorder)
    await collect(failing.stream_message(message("hello?", "t2")))
    await settled(failing)

    assert [(report.outcome, report.llm_error) for report in recorder.reports] == [
        ("interrupted", None),
        ("failed", "ConnectionError"),
    ]
    assert "response_end" not in recorder.reports[0].stages
    assert recorder.open == 0


async def test_a_slow_model_gets_a_filler_that_is_stored_with_the_reply(store: AgentStore) -> None:
    async def slow(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        await asyncio.sleep(0.3)
        yield "Paris."

    runner = make_runner(store, slow, filler_after_ms=50, slow_filler="Let me think.")
    events = await collect(runner.stream_message(message("capital of France?", "t1")))

    tts = [getattr(event, "content", "") for event in events if event.type == "response.tts"]
    assert tts == ["Let me think. ", "Paris."]
    assert said(await history(store))[-1] == ("assistant", "Let me think. Paris.")


async def test_a_prompt_model_gets_no_filler(store: AgentStore) -> None:
    runner = make_runner(store, Model(["Paris."]).stream, filler_after_ms=200)

    events = await collect(runner.stream_message(message("capital of France?", "t1")))

    assert spoken(events) == "Paris."


async def test_words_that_queue_up_behind_a_slow_write_leave_together(store: AgentStore) -> None:
    model = Model([f" w{index}" for index in range(20)], delay=0.002)
    runner = make_runner(store, model.stream)
    events = runner.stream_message(message("count", "t1"))

    first = await anext(events)
    await asyncio.sleep(0.3)  # As if writing the first chunk to a slow connection took this long.
    rest = [event async for event in events]

    assert first.type == "response.tts" and getattr(first, "content", "") == "w0"
    tts = [getattr(event, "content", "") for event in rest if event.type == "response.tts"]
    assert len(tts) < 5, "the queued words must leave in one write, not one each"
    assert "".join(["w0", *tts]) == "w0" + "".join(f" w{index}" for index in range(1, 20))
    assert rest[-1].type == "response.end"


# --- A long call: usage limits apply to each turn, the conversation's total is kept ----------------------


def tools_this_turn(messages: list[ModelMessage]) -> int:
    """How many tool results the model was sent since the caller last spoke."""
    count = 0
    for message in reversed(messages):
        parts = message.parts
        if any(isinstance(part, UserPromptPart) for part in parts):
            return count
        count += sum(isinstance(part, ToolReturnPart) for part in parts)
    return count


async def test_a_conversation_runs_well_past_fifty_turns_and_keeps_its_usage_total(store: AgentStore) -> None:
    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield f"Reply {len(said(messages)) // 2}."

    runner = make_runner(store, stream)
    replies: list[str] = []
    for index in range(60):
        replies.append(spoken(await collect(runner.stream_message(message(f"turn {index}", f"t{index}")))))
        if index in (0, 59):
            record = await store.read_record("conv")
            assert record is not None and record.usage.requests == index + 1, (index, record)

    assert replies == [f"Reply {index}." for index in range(60)]
    stored = await history(store)
    assert len(stored) == 120
    assert {status for *_, status in statuses(stored)} == {None, "completed"}


async def test_usage_limits_apply_to_each_turn_and_every_turn_counts_in_the_total(store: AgentStore) -> None:
    # Each turn asks for `lookup` once and then answers: two model requests, within a limit of two per turn.
    # The last turn wants a second lookup: its third request would pass the limit, so it fails alone.
    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        wanted = 2 if said(messages)[-1] == ("user", "look twice") else 1
        done = tools_this_turn(messages)
        if done < wanted:
            yield {0: DeltaToolCall(name="lookup", json_args="{}", tool_call_id=f"call-{len(messages)}")}
            return
        yield f"Found it after {done}."

    agent = build_agent(model=FunctionModel(stream_function=stream))

    @agent.tool_plain
    def lookup() -> str:  # pyright: ignore[reportUnusedFunction]
        return "here"

    runner = TurnRunner(agent=agent, store=store, poll_interval=0.02, usage_limits=UsageLimits(request_limit=2))
    answers = [
        spoken(await collect(runner.stream_message(message(f"look {index}", f"t{index}")))) for index in range(3)
    ]
    failed = spoken(await collect(runner.stream_message(message("look twice", "t3"))))

    assert [answer.removeprefix(f"{TOOL_FILLER} ") for answer in answers] == ["Found it after 1."] * 3
    assert failed.endswith(APOLOGY)
    stored = await history(store)
    assert statuses(stored)[-1] == ("t3", "assistant", "failed")
    record = await store.read_record("conv")
    assert record is not None and record.usage.requests == 3 * 2 + 2, "the failed turn's requests count too"
    assert record.usage.tool_calls == 3 + 2


# --- A replay never touches another turn ----------------------------------------------------------------


class Held:
    """A scripted model whose replies stream until a chosen token, then wait for `release` before going on."""

    def __init__(self, *replies: list[str], hold_at: int = 3) -> None:
        self.replies = list(replies)
        self.hold_at = hold_at
        self.release = asyncio.Event()
        self.calls: list[list[tuple[str, str]]] = []

    async def stream(self, messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        self.calls.append(said(messages))
        tokens = self.replies.pop(0) if self.replies else ["Okay."]
        for index, token in enumerate(tokens):
            if index == self.hold_at and len(tokens) > self.hold_at:
                await self.release.wait()
            yield token


LONG = [f" w{index}" for index in range(12)]
TWO_COMPLETED_TURNS = [
    ("t1", "user", None),
    ("t1", "assistant", "completed"),
    ("t2", "user", None),
    ("t2", "assistant", "completed"),
]


async def test_a_replay_of_an_earlier_turn_does_not_stop_the_turn_now_streaming(store: AgentStore) -> None:
    model = Held(["First reply."], LONG)
    runner = make_runner(store, model.stream)
    await collect(runner.stream_message(message("first", "t1"), delivery="d1"))

    streaming = Listener(runner.stream_message(message("second", "t2"), delivery="d2"), after=1)
    await streaming.spoke.wait()
    replay = await collect(runner.stream_message(message("first", "t1"), delivery="d1"))
    model.release.set()
    events = await asyncio.wait_for(streaming.task, 10)

    assert spoken(replay) == "First reply."
    assert spoken(events) == "".join(LONG).strip(), "the replay cut the turn now streaming"
    assert [event.type for event in events].count("response.end") == 1
    assert len(model.calls) == 2
    stored = await history(store)
    assert statuses(stored) == TWO_COMPLETED_TURNS
    assert said(stored)[3] == ("assistant", "".join(LONG))


async def test_a_replayed_session_start_does_not_stop_the_turn_now_streaming(store: AgentStore) -> None:
    model = Held(LONG)
    runner = make_runner(store, model.stream, welcome_message="Welcome!")
    start = SessionStartEvent(conversation_id="conv", session_id="sess", turn_id="w1")
    await collect(runner.sessions.stream_session_start(start))

    streaming = Listener(runner.stream_message(message("hello", "t1"), delivery="d1"), after=1)
    await streaming.spoke.wait()
    replay = await collect(runner.sessions.stream_session_start(start))
    model.release.set()
    events = await asyncio.wait_for(streaming.task, 10)

    assert spoken(replay) == "Welcome!"
    assert spoken(events) == "".join(LONG).strip(), "the replayed session.start cut the turn now streaming"
    assert statuses(await history(store)) == [
        ("w1", "assistant", "completed"),
        ("t1", "user", None),
        ("t1", "assistant", "completed"),
    ]


async def test_a_replay_on_another_worker_neither_stops_nor_asks_to_stop_the_turn_streaming(tmp_path: Path) -> None:
    model_a = Held(["First reply."], LONG)
    model_b = Model(["Never said."])
    async with SQLiteStore(tmp_path / "c.db") as store_a, SQLiteStore(tmp_path / "c.db") as store_b:
        worker_a = make_runner(store_a, model_a.stream, owner="worker-a")
        worker_b = make_runner(store_b, model_b.stream, owner="worker-b")
        await collect(worker_a.stream_message(message("first", "t1"), delivery="d1"))

        streaming = Listener(worker_a.stream_message(message("second", "t2"), delivery="d2"), after=1)
        await streaming.spoke.wait()
        replay = await collect(worker_b.stream_message(message("first", "t1"), delivery="d1"))
        asked = await store_b.get_markers([("conv", "cancel")])
        model_a.release.set()
        events = await asyncio.wait_for(streaming.task, 10)
        stored = await history(store_b)

    assert spoken(replay) == "First reply."
    assert asked == [None], "the replay asked the other worker to cancel its turn"
    assert spoken(events) == "".join(LONG).strip()
    assert model_b.calls == []
    assert statuses(stored)[-1] == ("t2", "assistant", "completed")


# --- A store outage while the reply is stored -------------------------------------------------------------


class FlakyStore(MemoryStore):
    """A memory store that fails every read and write of a record while `down` is set, as an outage would."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.failures = 0
        self.hold: asyncio.Event | None = None
        """When set, the next record write waits for this event before it is done."""
        self.holding = asyncio.Event()

    def _check(self) -> None:
        if self.down:
            self.failures += 1
            raise StoreUnavailableError("the store is down")

    async def read_record(self, conversation_id: str) -> ConversationRecord | None:
        self._check()
        return await super().read_record(conversation_id)

    async def write_record_replacing(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
        released: Sequence[str] = (),
    ) -> None:
        self._check()
        if (hold := self.hold) is not None:
            self.hold = None
            self.holding.set()
            await hold.wait()
        await super().write_record_replacing(
            record, new_entries=new_entries, expected_revision=expected_revision, released=released
        )


async def eventually(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_a_reply_the_store_failed_to_take_is_stored_once_the_store_is_back() -> None:
    store = FlakyStore()
    model = Held(["All", " of", " it", " was", " said."])
    runner = make_runner(store, model.stream, close_retry_for=60)
    streaming = Listener(runner.stream_message(message("tell me", "t1")), after=1)
    await streaming.spoke.wait()
    store.down = True
    model.release.set()
    # The caller's stream ends at once, with all of the reply, while its close is retried.
    events = await asyncio.wait_for(streaming.task, 10)
    assert spoken(events) == "All of it was said."
    assert events[-1].type == "response.end"
    await eventually(lambda: store.failures >= 2, "the close was tried again")
    store.down = False
    await settled(runner)

    stored = await history(store)
    assert statuses(stored) == [("t1", "user", None), ("t1", "assistant", "completed")]
    assert said(stored)[-1] == ("assistant", "All of it was said.")


async def test_a_reply_the_store_never_took_is_stored_by_the_next_turn_of_the_worker() -> None:
    store = FlakyStore()
    model = Held(["All", " of", " it", " was", " said."], ["Next."])
    runner = make_runner(store, model.stream, close_retry_for=0.2)
    streaming = Listener(runner.stream_message(message("tell me", "t1")), after=1)
    await streaming.spoke.wait()
    store.down = True
    model.release.set()
    await asyncio.wait_for(streaming.task, 10)
    await settled(runner)  # The close gave up.
    store.down = False
    assert statuses(await history(store))[-1] == ("t1", "assistant", "pending")

    events = await collect(runner.stream_message(message("and then?", "t2")))

    assert spoken(events) == "Next."
    assert model.calls[-1] == [("user", "tell me"), ("assistant", "All of it was said."), ("user", "and then?")]
    stored = await history(store)
    assert statuses(stored) == TWO_COMPLETED_TURNS
    record = await store.read_record("conv")
    assert record is not None and record.usage.requests == 2, "the late reply's usage joins the total"


async def test_a_turn_that_cannot_close_in_time_is_taken_over_with_the_words_it_sent() -> None:
    store = FlakyStore()
    model = Held(["All", " of", " it", " was", " said."], ["Next."])
    runner = make_runner(store, model.stream, handover_timeout=0.3)
    streaming = Listener(runner.stream_message(message("tell me", "t1")), after=1)
    await streaming.spoke.wait()
    store.hold = release = asyncio.Event()  # The close's write hangs, as on a stalled store.
    model.release.set()
    await store.holding.wait()
    await eventually(lambda: "".join(runner._active["conv"].sent) == "All of it was said.", "all of it was sent")  # pyright: ignore[reportPrivateUsage]

    events = await collect(runner.stream_message(message("hello?", "t2")))
    release.set()
    first = await asyncio.wait_for(streaming.task, 10)
    await settled(runner)

    assert spoken(events) == "Next."
    assert first[-1].type == "response.end"
    assert model.calls[-1] == [("user", "tell me"), ("assistant", "All of it was said."), ("user", "hello?")]
    stored = await history(store)
    assert statuses(stored)[1] == ("t1", "assistant", "lost")
    assert said(stored)[1] == ("assistant", "All of it was said."), "a lost reply keeps the words that were sent"


# --- What the caller heard must be what was sent ------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "kept"),
    [
        # Compared with the reply as it was spoken (markdown removed), whitespace aside.
        ({"text_heard": "One,  two,", "words_heard": 2}, "One, two,"),
        ({"text_heard": "Buy now at evil.example", "words_heard": 2}, "One, two,"),
        ({"text_heard": "Buy now at evil.example"}, "**One**, two, three, four."),
    ],
)
async def test_text_heard_is_kept_only_as_a_prefix_of_what_was_sent(
    store: AgentStore, context: dict[str, Any], kept: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model(["**One**, two,", " three, four."], ["Okay."])
    runner = make_runner(store, model.stream)
    await collect(runner.stream_message(message("count", "t1")))

    heard = {"previous_turn_interrupted": True, "assistant_turn_id": "t1", **context}
    with caplog.at_level("INFO", logger="layercode_agent.turns"):
        await collect(runner.stream_message(message("enough", "t2", interruption_context=heard)))

    assert model.calls[-1][1] == ("assistant", f"{kept} [interrupted]")
    stored = await history(store)
    assert said(stored)[1] == ("assistant", kept)
    assert statuses(stored)[1] == ("t1", "assistant", "interrupted")
    refused = [record.getMessage() for record in caplog.records if "not a prefix" in record.getMessage()]
    if context["text_heard"].startswith("Buy"):
        assert len(refused) == 1 and "evil" not in refused[0], refused
    else:
        assert refused == []


# --- The parts the runner composes ------------------------------------------------------------------


def test_the_adapter_speaks_cleaned_text_and_reports_tools_keeping_only_calls_that_returned() -> None:
    timing = TurnTiming()
    adapter = ReplyAdapter("t1", timing, tool_filler="One moment.")
    call = ToolCallPart("lookup", {"q": "x"}, tool_call_id="c1")
    unanswered = ToolCallPart("other", {}, tool_call_id="c2")
    returned = ToolReturnPart("lookup", "42", tool_call_id="c1")
    table: list[tuple[Any, list[OutboundEvent]]] = [
        (PartStartEvent(index=0, part=TextPart("**Hi** ")), [TTSResponse(content="Hi ", turn_id="t1")]),
        (
            PartDeltaEvent(index=0, delta=TextPartDelta(content_delta="there [sigh")),
            [TTSResponse(content="there ", turn_id="t1")],
        ),
        (
            PartDeltaEvent(index=0, delta=TextPartDelta(content_delta="] now")),
            [TTSResponse(content="now", turn_id="t1")],
        ),
        (PartEndEvent(index=0, part=TextPart("**Hi** there [sigh] now")), []),
        (
            FunctionToolCallEvent(part=call),
            [DataResponse(content={"tool": "lookup", "status": "running"}, turn_id="t1")],
        ),
        (
            FunctionToolResultEvent(part=returned),
            [DataResponse(content={"tool": "lookup", "status": "done"}, turn_id="t1")],
        ),
        # Nothing said since the model was asked again: the filler covers the silence.
        (
            FunctionToolCallEvent(part=unanswered),
            [
                TTSResponse(content="One moment. ", turn_id="t1"),
                DataResponse(content={"tool": "other", "status": "running"}, turn_id="t1"),
            ],
        ),
        (PartDeltaEvent(index=1, delta=ToolCallPartDelta(args_delta="{}")), []),
    ]
    for event, expected in table:
        assert list(adapter.convert(event)) == expected, event
    assert adapter.flush() == ()
    assert adapter.finished_calls == [(call, returned)]
    assert list(adapter.calls) == ["c2"]
    assert list(timing.stages) == [Stage.LLM_FIRST_TOKEN.value]


async def test_a_turn_is_cancelled_only_while_it_answers_and_reported_once_both_sides_are_done() -> None:
    reports: list[Turn] = []
    turn = Turn("conv", "t1", report=reports.append)
    turn.task = asyncio.get_running_loop().create_task(asyncio.sleep(10))
    try:
        turn.stop()  # Beginning: never cut short, but the stop is remembered.
        assert turn.stop_requested and not turn.task.cancelled()
        turn.enter(Phase.ANSWERING)
        turn.stop()
        await asyncio.sleep(0)
        assert turn.task.cancelled()
    finally:
        turn.task.cancel()
    turn.queue.put_nowait(TTSResponse(content="Hi", turn_id="t1"))
    turn.queue.put_nowait(None)
    events = turn.events()
    assert await anext(events) == TTSResponse(content="Hi", turn_id="t1")
    turn.enter(Phase.FINISHED)
    turn.maybe_report()
    assert reports == [], "the response still streams"
    assert [event async for event in events] == [EndResponse(turn_id="t1")]
    assert reports == [turn] and turn.phase is Phase.REPORTED
    turn.maybe_report()
    assert reports == [turn], "reported once"
