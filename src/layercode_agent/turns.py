"""The use case: one webhook in, the events to stream back out, and the conversation kept true.

This is the only module that combines the Layercode protocol, the agent and the store. A `message`
runs as a turn in its own task, which the HTTP response only reads from:

1. **Begin**, atomically (see `history`): a duplicate delivery of a turn streaming here or already in
   the log gets the stored reply instead of a second LLM call, and is recognised before anything
   else, so it never touches another turn; a turn still streaming for the same conversation is
   stopped and closed first (latest turn wins), here or on another worker; the reply the caller
   barged into becomes what they heard (`interruption_context.text_heard`, when it is a prefix of
   what was sent); then the caller's words and an assistant placeholder are stored, all before the
   model is asked anything.
2. **Stream** the agent's reply as `response.tts` deltas the moment the model yields them. The
   run's usage limits apply to this turn alone; the conversation's total is kept in the store.
3. **Close** the placeholder whatever happens: the full reply; the words already sent if the caller
   hung up or barged in (the task is cancelled, so no tool runs after the abort, and only finished
   tool calls are kept); a spoken apology if the model failed. Every stream ends with one
   `response.end`. A close the store fails is tried again for a while, then left to the
   conversation's next turn on this worker, which stores it first.

Workers sharing a store find each other's turns through it: each stream's worker polls for requests
to cancel its turns and keeps a heartbeat marker, so a turn whose worker died is taken over after at
most `handover_timeout` seconds instead of blocking the conversation.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pydantic_ai.agent import AbstractAgent, AgentRun
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationRecord
from pydantic_ai.messages import (
    AgentStreamEvent,
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponsePart,
    PartDeltaEvent,
    PartEndEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RunUsage, UsageLimits

from .agent import (
    APOLOGY,
    INTERRUPTED_MARK,
    SLOW_FILLER,
    TOOL_FILLER,
    CallContext,
    VoiceTextCleaner,
    clean_text,
)
from .history import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    LOST,
    PENDING,
    Change,
    History,
    ReplyState,
    as_heard,
    find_reply,
    has_turn,
    last_reply,
    llm_messages,
    pending_reply,
    reply_text,
    turn_meta,
    what_was_heard,
)
from .protocol import (
    DataEvent,
    DataResponse,
    EndResponse,
    InboundEvent,
    InterruptionContext,
    MessageEvent,
    OutboundEvent,
    SessionEndEvent,
    SessionStartEvent,
    SessionUpdateEvent,
    TTSResponse,
)
from .stores import AgentStore, StoreError

__all__ = [
    "DataHandler",
    "DeliveryInProgressError",
    "TurnObserver",
    "TurnReport",
    "TurnRunner",
    "TurnTiming",
    "default_data_handler",
]

logger = logging.getLogger("layercode_agent.turns")

DataHandler = Callable[[DataEvent], Awaitable[Any]]
"""Answers a `data` webhook; its return value becomes the `content` of the `response.data` reply."""

DELIVERY_TTL = 24 * 3600.0
"""How long a `data`, `session.end` or `session.update` delivery is remembered, to ignore a repeat."""
CANCEL_TTL = 60.0
"""How long a request to cancel another worker's turn stays up."""
HEARTBEAT_EVERY = 2.0
HEARTBEAT_TTL = 5.0
"""A worker streaming a turn renews its heartbeat this often; without one for this long it is gone."""
_CLOSE_RETRY_FIRST = 0.05
_CLOSE_RETRY_MAX = 1.0
"""Seconds between tries to store a reply the store failed to take: doubling from the first to the most."""
_UNCLOSED_LIMIT = 1000
"""Replies the store did not take that a worker keeps for their conversations' next turns, at most."""
_CLAIMED = "claimed:"
"""A delivery claim while its first delivery is handled: this, then the claimant's `owner`.

The claimant renews it for `HEARTBEAT_TTL` every `HEARTBEAT_EVERY / 2` seconds while it works, so it
outlives a dead worker by at most that, and a claimant without a heartbeat marker is taken over at
once. Once answered, the claim holds the answer (JSON, which never starts with this) for `DELIVERY_TTL`.
"""
_RECORDED = "1"
"""A session event's claim once the event is stored."""


class DeliveryInProgressError(Exception):
    """A repeated delivery stopped waiting for the first one, which a live worker is still handling."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        """Why, safe to send back (the caller's own conversation id, nothing internal)."""
        self.retry_after = math.ceil(HEARTBEAT_TTL)
        """Seconds after which a retry finds the answer, or the claim of a worker that died gone."""


async def default_data_handler(event: DataEvent) -> Any:
    """Acknowledge client data; replace it with `DATA_HANDLER=module:function` or `create_app(data_handler=...)`."""
    return {"status": "ok"}


@dataclass
class TurnTiming:
    """Milliseconds from the moment the webhook was received to each stage of its turn.

    Stages, in the order they happen: `signature_verified`, `history_loaded` (the log read and the
    caller's words stored), `llm_request`, `llm_first_token`, `first_tts` (the first `response.tts`
    handed to the HTTP response), `llm_last_token`, `history_saved` (the reply stored),
    `response_end` (`response.end` written). A turn cut short has only the stages it reached.
    """

    started: float = field(default_factory=time.perf_counter)
    """`time.perf_counter()` when the webhook arrived."""
    wall: float = field(default_factory=time.time)
    """The same moment as Unix time, for spans."""
    stages: dict[str, float] = field(default_factory=dict[str, float])

    def mark(self, stage: str, at: float | None = None) -> None:
        """Record a stage once (the first time it happens), now or at the `perf_counter()` value `at`."""
        if stage not in self.stages:
            self.stages[stage] = round(((at if at is not None else time.perf_counter()) - self.started) * 1000, 3)


@dataclass(frozen=True)
class TurnReport:
    """What happened in one turn, for metrics, traces and the per-turn log line."""

    conversation_id: str
    turn_id: str
    outcome: str
    """`completed`, `interrupted`, `failed` or `duplicate`."""
    stages: dict[str, float]
    """Milliseconds since the webhook arrived, per stage (see `TurnTiming`)."""
    received_at: float
    """Unix time the webhook arrived."""
    llm_error: str | None = None
    """The exception class when the model failed."""


class TurnObserver:
    """Hooks for metrics and tracing; the default does nothing. Every hook must be fast and never raise."""

    def stream_opened(self) -> None:
        """A turn's response started streaming."""

    def stream_closed(self) -> None:
        """A turn's response finished or was aborted."""

    def turn_finished(self, report: TurnReport) -> None:
        """A turn ended; called once per turn, after `response.end` was written if the caller was still there."""

    def store_operation(self, operation: str, seconds: float) -> None:
        """A store round of the turn record (`begin`, `close`, `read`) took `seconds`."""


# --- What beginning a turn found ------------------------------------------------------------------


@dataclass(frozen=True)
class _Started:
    messages: list[ModelMessage]
    """The log as it now stands, ending with the new turn's messages."""
    refused: str | None = None
    """Why the `interruption_context` was not taken as it came, for the log."""
    recovered: _Unclosed | None = None
    """A reply of this worker the store had not taken, now stored with this turn's first messages."""


@dataclass(frozen=True)
class _Unclosed:
    """A turn's closing messages the store did not take: kept for the conversation's next turn on this worker."""

    turn_id: str
    closing: list[ModelMessage]
    usage: RunUsage | None

    @property
    def text(self) -> str:
        """The reply's text, as stored."""
        reply = self.closing[-1]
        return reply_text(reply) if isinstance(reply, ModelResponse) else ""


@dataclass(frozen=True)
class _TakeOver:
    """The open turn a new turn closes itself, and what this worker knows of its reply."""

    turn_id: str | None
    sent: str | None = None
    """What its response passed on to Layercode, when this worker streamed it."""
    kept: _Unclosed | None = None
    """Its closing messages, when this worker's store write of them failed."""


@dataclass(frozen=True)
class _Duplicate:
    pass


@dataclass(frozen=True)
class _Busy:
    turn_id: str | None
    owner: str | None


class _Turn:
    """A turn being answered: its task produces events, the HTTP response reads them."""

    def __init__(
        self, runner: TurnRunner, conversation_id: str, turn_id: str, timing: TurnTiming | None = None
    ) -> None:
        self.runner = runner
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self.queue: asyncio.Queue[OutboundEvent | None] = asyncio.Queue()
        self.sent: list[str] = []
        """The text the response has passed on to Layercode."""
        self.finished = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self.cancellable = False
        """True only while the model runs: beginning and closing are never cut short."""
        self.outcome = COMPLETED
        self.llm_error: str | None = None
        self.timing = timing or TurnTiming()
        self.streaming = False
        self.reported = False
        self.usage: RunUsage | None = None
        """The model run's usage so far (pydantic-ai keeps it current), once the run started."""

    def stop(self) -> None:
        """Stop the turn (caller gone, or a newer turn arrived); it closes with what was sent."""
        self.stopping = True
        if self.cancellable and self.task is not None:
            self.task.cancel()

    async def events(self) -> AsyncGenerator[OutboundEvent]:
        """What to stream to Layercode, ending with `response.end`; stops the turn if the reader goes away."""
        observer = self.runner.observer
        self.streaming = True
        observer.stream_opened()
        queue = self.queue
        held: OutboundEvent | None = None
        ended = False
        try:
            while not ended:
                event = held if held is not None else await queue.get()
                held = None
                if event is None:
                    break
                if isinstance(event, TTSResponse) and not queue.empty():
                    # Words that queued up while the last chunk was being written leave together:
                    # one write instead of several, and no word waits for another.
                    content = event.content
                    while not queue.empty():
                        following = queue.get_nowait()
                        if following is None:
                            ended = True
                            break
                        if not isinstance(following, TTSResponse):
                            held = following
                            break
                        content += following.content
                    event = TTSResponse(content=content, turn_id=event.turn_id)
                if isinstance(event, TTSResponse):
                    if not self.sent:
                        self.timing.mark("first_tts")
                    self.sent.append(event.content)
                yield event
            yield EndResponse(turn_id=self.turn_id)
            self.timing.mark("response_end")
        except (asyncio.CancelledError, GeneratorExit):
            self.stop()
            raise
        finally:
            self.streaming = False
            observer.stream_closed()
            self.maybe_report()

    def maybe_report(self) -> None:
        """Report the turn once both its task and its response (if one is streaming) are done."""
        if self.finished.is_set() and not self.streaming and not self.reported:
            self.reported = True
            self.runner.report(self)


class TurnRunner:
    """Runs turns of any conversation; one instance serves the whole process."""

    def __init__(
        self,
        *,
        agent: AbstractAgent[Any, Any],
        store: AgentStore,
        model: Model | None = None,
        model_settings: ModelSettings | None = None,
        welcome_message: str = "",
        llm_timeout: float = 30.0,
        data_handler: DataHandler = default_data_handler,
        apology: str = APOLOGY,
        tool_filler: str = TOOL_FILLER,
        interrupted_mark: str = INTERRUPTED_MARK,
        handover_timeout: float = 3.0,
        poll_interval: float = 0.05,
        owner: str | None = None,
        observer: TurnObserver | None = None,
        filler_after_ms: float | None = None,
        slow_filler: str = SLOW_FILLER,
        usage_limits: UsageLimits | None = None,
        close_retry_for: float = 10.0,
    ) -> None:
        """Create the runner.

        Args:
            agent: The pydantic-ai agent answering turns.
            store: Where conversations are kept.
            model: The model to run the agent with, if the agent has none of its own.
            model_settings: Settings for every model request.
            welcome_message: Spoken on `session.start`; empty for none.
            llm_timeout: Seconds a model request may take before the turn fails with an apology.
            data_handler: Answers `data` webhooks.
            apology: Spoken when the model fails.
            tool_filler: Spoken while a tool runs if nothing was said yet.
            interrupted_mark: Ends an interrupted reply in the history the model sees.
            handover_timeout: How long a new turn waits for another worker to close the turn it
                streams in the same conversation before closing it itself.
            poll_interval: How often a worker checks the store for requests to cancel its turns.
            owner: This worker's name in the store; unique per process by default.
            observer: Receives each turn's stages and outcome (metrics, traces).
            filler_after_ms: Speak `slow_filler` if the model has said nothing this long after the
                request was sent; `None` never does.
            slow_filler: What to say while a slow model thinks; it is stored as part of the reply.
            usage_limits: What one turn's model run may use (requests, tokens); pydantic-ai's
                default (50 requests) when `None`. Each turn starts from nothing: the conversation's
                running total is kept in the store, never counted against a turn.
            close_retry_for: Seconds a turn keeps trying to store its reply when the store fails
                (with backoff); after that the reply waits in memory for the conversation's next
                turn on this worker, which stores it first.
        """
        self.agent = agent
        self.store = store
        self.model = model
        self.model_settings = model_settings
        self.welcome_message = welcome_message
        self.llm_timeout = llm_timeout
        self.data_handler = data_handler
        self.apology = apology
        self.tool_filler = tool_filler
        self.interrupted_mark = interrupted_mark
        self.handover_timeout = handover_timeout
        self.poll_interval = poll_interval
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.observer = observer or TurnObserver()
        self.history = History(store, observe=self.observer.store_operation)
        self.filler_after_ms = filler_after_ms
        self.slow_filler = slow_filler
        self.usage_limits = usage_limits or UsageLimits()
        self.close_retry_for = close_retry_for
        self._active: dict[str, _Turn] = {}
        self._unclosed: dict[str, _Unclosed] = {}
        """Per conversation, the reply of this worker the store did not take (at most one: the newest turn's)."""
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._heartbeat_at = float("-inf")

    # ------------------------------------------------------------------ message

    def stream_message(
        self, event: MessageEvent, *, delivery: str | None = None, timing: TurnTiming | None = None
    ) -> AsyncGenerator[OutboundEvent]:
        """Answer a `message`: the reply's events as they come, ending with one `response.end`.

        Args:
            event: The webhook.
            delivery: A digest of the signed body, to recognise the same delivery without a `turn_id`.
            timing: Started when the webhook arrived (with `signature_verified` marked), if the caller has one.
        """
        turn_id = event.turn_id or delivery or f"local-{secrets.token_hex(8)}"
        turn = _Turn(self, event.conversation_key, turn_id, timing)
        turn.task = self._spawn(self._run_turn(turn, event, delivery))
        return turn.events()

    async def _run_turn(self, turn: _Turn, event: MessageEvent, delivery: str | None) -> None:
        put = turn.queue.put_nowait
        timing = turn.timing
        try:
            user = ModelRequest(
                parts=[UserPromptPart(event.text)],
                metadata=turn_meta(turn.turn_id, "user", delivery=delivery, session_id=event.session_id),
            )
            placeholder = ModelResponse(
                parts=[],
                metadata=turn_meta(
                    turn.turn_id,
                    "assistant",
                    PENDING,
                    owner=self.owner,
                    started_at=datetime.now(UTC).isoformat(),
                ),
            )
            try:
                began = await self._begin(turn, delivery, [user, placeholder], event.interruption_context)
            except StoreError as exc:
                # A store outage is not a bug: one line with its cause, no traceback (one per turn would flood the log).
                logger.error("could not store the caller's message (conversation %s): %s", turn.conversation_id, exc)
                turn.outcome = FAILED
                put(TTSResponse(content=self.apology, turn_id=turn.turn_id))
                return
            timing.mark("history_loaded")
            if isinstance(began, _Duplicate):
                turn.outcome = "duplicate"
                # Stored as the model wrote it; spoken as the first delivery was, without markdown.
                text = clean_text(await self._stored_reply(turn.conversation_id, turn.turn_id))
                if text:
                    put(TTSResponse(content=text, turn_id=turn.turn_id))
                return
            closing, usage = await self._answer(turn, began, event)
            await self._store_reply(turn, closing, usage)
        except Exception:
            logger.exception("turn %s of conversation %s failed", turn.turn_id, turn.conversation_id)
            turn.outcome = FAILED
            put(TTSResponse(content=self.apology, turn_id=turn.turn_id))
        finally:
            turn.queue.put_nowait(None)
            turn.finished.set()
            if self._active.get(turn.conversation_id) is turn:
                del self._active[turn.conversation_id]
            turn.maybe_report()

    def report(self, turn: _Turn) -> None:
        """The per-turn log line, and the observer's report."""
        report = TurnReport(
            conversation_id=turn.conversation_id,
            turn_id=turn.turn_id,
            outcome=turn.outcome,
            stages=dict(turn.timing.stages),
            received_at=turn.timing.wall,
            llm_error=turn.llm_error,
        )
        logger.info(
            "turn %s conversation=%s turn=%s stages=%s",
            report.outcome,
            report.conversation_id,
            report.turn_id,
            report.stages,
        )
        try:
            self.observer.turn_finished(report)
        except Exception:
            logger.exception("the turn observer failed")

    async def _answer(
        self, turn: _Turn, began: _Started, event: MessageEvent
    ) -> tuple[list[ModelMessage], RunUsage | None]:
        """Stream the agent's reply into the turn's queue; returns the messages that close the turn."""
        put = turn.queue.put_nowait
        turn_id = turn.turn_id
        produced: list[str] = []
        calls: dict[str, ToolCallPart] = {}
        finished_calls: list[tuple[ToolCallPart, ToolReturnPart]] = []

        def closing(text: str, status: str) -> list[ModelMessage]:
            # Only tool calls that returned are kept: the history never holds a call without its result.
            messages: list[ModelMessage] = []
            if finished_calls:
                messages.append(
                    ModelResponse(parts=[call for call, _ in finished_calls], metadata=turn_meta(turn_id, "tool"))
                )
                messages.append(
                    ModelRequest(parts=[ret for _, ret in finished_calls], metadata=turn_meta(turn_id, "tool"))
                )
            parts = [TextPart(text)] if text else []
            messages.append(ModelResponse(parts=parts, metadata=turn_meta(turn_id, "assistant", status)))
            return messages

        if turn.stopping:  # The caller left (or a newer turn came) before the model was asked.
            turn.outcome = INTERRUPTED
            return closing("", INTERRUPTED), None
        # No usage carried in: pydantic-ai checks `usage_limits` against the run's usage, which starts from
        # the one it is given, so the conversation's running total would count against every turn (and,
        # past 50 requests, fail each one). The close adds this turn's usage to the stored total instead.
        conversation = Conversation(
            messages=llm_messages(began.messages[:-1], self.interrupted_mark),
            conversation_id=turn.conversation_id,
        )
        turn.cancellable = True
        filler: list[str] = []

        def speak_filler() -> None:
            # The model has been silent for `filler_after_ms`: say something rather than leave a silence.
            if not produced and turn.cancellable:
                filler.append(f"{self.slow_filler} ")
                produced.append(filler[0])
                put(TTSResponse(content=filler[0], turn_id=turn_id))

        timer = (
            asyncio.get_running_loop().call_later(self.filler_after_ms / 1000, speak_filler)
            if self.filler_after_ms is not None and self.slow_filler
            else None
        )
        try:
            # Closed here, in this task: the run's context managers must exit in the context they entered.
            async with aclosing(self._reply(conversation, event, turn, calls, finished_calls)) as replies:
                async for out in replies:
                    if isinstance(out, TTSResponse):
                        produced.append(out.content)
                        put(out)
                    elif isinstance(out, DataResponse):
                        put(out)
                    else:
                        messages, usage = out
                        turn.cancellable = False
                        if filler:  # The caller heard it: it belongs to the reply.
                            messages[-1] = _with_filler(messages[-1], filler[0])
                        return messages, usage
            raise RuntimeError("the agent run ended without a result")
        except asyncio.CancelledError:
            turn.cancellable = False
            # What is still queued never reached the caller: drop it and keep what was sent.
            while not turn.queue.empty():
                turn.queue.get_nowait()
            turn.outcome = INTERRUPTED
            return closing("".join(turn.sent), INTERRUPTED), _spent(turn)
        except Exception as exc:
            turn.cancellable = False
            logger.error(
                "LLM failed in conversation %s turn %s: %s: %s",
                turn.conversation_id,
                turn_id,
                type(exc).__name__,
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            apology = (" " if produced else "") + self.apology
            put(TTSResponse(content=apology, turn_id=turn_id))
            turn.outcome = FAILED
            turn.llm_error = type(exc).__name__
            return closing("".join(produced) + apology, FAILED), _spent(turn)
        finally:
            if timer is not None:
                timer.cancel()

    async def _reply(
        self,
        conversation: Conversation,
        event: MessageEvent,
        turn: _Turn,
        calls: dict[str, ToolCallPart],
        finished_calls: list[tuple[ToolCallPart, ToolReturnPart]],
    ) -> AsyncGenerator[TTSResponse | DataResponse | tuple[list[ModelMessage], RunUsage]]:
        """The agent's reply as events; the messages that close the turn and this turn's usage come last."""
        turn_id = turn.turn_id
        timing = turn.timing
        cleaner = VoiceTextCleaner()
        spoke_since_request = False
        deps = CallContext(
            conversation_id=turn.conversation_id,
            turn_id=turn_id,
            session_id=event.session_id,
            from_phone_number=event.from_phone_number,
            to_phone_number=event.to_phone_number,
            metadata=event.all_metadata,
        )
        async with self.agent.iter(
            conversation=conversation,
            deps=deps,
            model=self.model,
            model_settings=self.model_settings,
            usage_limits=self.usage_limits,
            timeout=self.llm_timeout,
        ) as run:
            turn.usage = run.usage
            async for agent_event in self._run_events(run, timing):
                text = ""
                if isinstance(agent_event, PartDeltaEvent):
                    if isinstance(agent_event.delta, TextPartDelta):
                        text = cleaner.feed(agent_event.delta.content_delta)
                elif isinstance(agent_event, PartStartEvent):
                    if isinstance(agent_event.part, TextPart):
                        timing.mark("llm_first_token")
                        text = cleaner.feed(agent_event.part.content)
                elif isinstance(agent_event, PartEndEvent):
                    if isinstance(agent_event.part, TextPart):
                        text = cleaner.flush()
                elif isinstance(agent_event, FunctionToolCallEvent):
                    if text := cleaner.flush():
                        yield TTSResponse(content=text, turn_id=turn_id)
                    if not spoke_since_request and self.tool_filler:
                        yield TTSResponse(content=f"{self.tool_filler} ", turn_id=turn_id)
                    calls[agent_event.tool_call_id] = agent_event.part
                    yield DataResponse(
                        content={"tool": agent_event.part.tool_name, "status": "running"}, turn_id=turn_id
                    )
                    spoke_since_request = False
                    continue
                elif isinstance(agent_event, FunctionToolResultEvent):
                    if (call := calls.pop(agent_event.tool_call_id, None)) is not None:
                        finished_calls.append((call, agent_event.part))
                    yield DataResponse(content={"tool": agent_event.part.tool_name, "status": "done"}, turn_id=turn_id)
                    continue
                if text:
                    spoke_since_request = True
                    yield TTSResponse(content=text, turn_id=turn_id)
            if text := cleaner.flush():
                yield TTSResponse(content=text, turn_id=turn_id)
            timing.mark("llm_last_token")
            result = run.result
            if result is None:
                raise RuntimeError("the agent run ended without a result")
            yield self._result_messages(result.new_messages(), turn_id), copy.copy(result.usage)

    async def _run_events(self, run: AgentRun[Any, Any], timing: TurnTiming) -> AsyncIterator[AgentStreamEvent]:
        """The run's model and tool events, read in this task.

        `agent.iter` with each node's own stream, rather than `run_stream_events`, which runs the
        agent in a second task and hands every token across a memory stream.
        """
        async for node in run:
            if self.agent.is_model_request_node(node):
                async with node.stream(run.ctx) as stream:
                    timing.mark("llm_request")
                    async for event in stream:
                        yield event
            elif self.agent.is_call_tools_node(node):
                async with node.stream(run.ctx) as stream:
                    async for event in stream:
                        yield event

    def _result_messages(self, messages: list[ModelMessage], turn_id: str) -> list[ModelMessage]:
        """The run's messages marked as this turn's: tool traffic, then the reply.

        A model that copied the interruption mark from its history gets it removed here (the caller
        never heard it either: the voice cleaner drops bracketed text), so it never spreads.
        """
        marked: list[ModelMessage] = []
        last = len(messages) - 1
        for index, message in enumerate(messages):
            role = "assistant" if index == last and isinstance(message, ModelResponse) else "tool"
            status = COMPLETED if role == "assistant" else None
            if role == "assistant" and self.interrupted_mark and isinstance(message, ModelResponse):
                message = replace(message, parts=[self._unmarked(part) for part in message.parts])
            marked.append(replace(message, metadata={**(message.metadata or {}), **turn_meta(turn_id, role, status)}))
        return marked

    def _unmarked(self, part: ModelResponsePart) -> ModelResponsePart:
        if not isinstance(part, TextPart) or self.interrupted_mark not in part.content:
            return part
        return replace(part, content=" ".join(part.content.replace(self.interrupted_mark, " ").split()))

    # ------------------------------------------------------------------ beginning and closing turns

    async def _begin(
        self,
        turn: _Turn,
        delivery: str | None,
        new_messages: list[ModelMessage],
        interruption: InterruptionContext | None,
    ) -> _Started | _Duplicate:
        """Add a turn's first messages to the log, after closing whatever turn is still open there.

        A repeated delivery is recognised before anything else (its turn streams here, or the log has
        it), so it never stops another turn, asks another worker to stop one, or changes the log.
        """
        conversation_id = turn.conversation_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handover_timeout
        asked: str | None = None
        take_over: _TakeOver | None = None
        await self._heartbeat()
        async with self._lock(conversation_id):
            while True:
                local = self._active.get(conversation_id)
                if local is not None and local is not turn:
                    if local.turn_id == turn.turn_id or await self._in_log(conversation_id, turn.turn_id, delivery):
                        return _Duplicate()  # A repeat of the turn streaming, or of an earlier one.
                    local.stop()  # Latest turn wins.
                    try:
                        await asyncio.wait_for(local.finished.wait(), max(deadline - loop.time(), 0.1))
                    except TimeoutError:
                        logger.warning("turn %s did not close in time; taking it over", local.turn_id)
                        take_over = _TakeOver(local.turn_id, sent="".join(local.sent))
                        del self._active[conversation_id]
                    continue
                if take_over is not None and (kept := self._unclosed.get(conversation_id)) is not None:
                    take_over = replace(take_over, kept=kept)

                def decide(
                    messages: list[ModelMessage],
                    record: ConversationRecord | None,
                    take_over: _TakeOver | None = take_over,
                ) -> Change[_Started | _Duplicate | _Busy]:
                    return self._decide_begin(
                        messages, record, turn.turn_id, delivery, new_messages, interruption, take_over
                    )

                began = await self.history.change(conversation_id, decide, operation="begin")
                if isinstance(began, _Started):
                    self._began(turn, began, take_over)
                    if _is_placeholder(new_messages):
                        self._active[conversation_id] = turn
                        self._watch()
                    return began
                if isinstance(began, _Duplicate):
                    return began
                # Another worker's turn is still open: ask it to stop, and take it over if its worker is gone.
                # (The same read found this turn absent from the log: a duplicate never gets here.)
                if began.owner == self.owner:
                    take_over = _TakeOver(began.turn_id)  # Ours, but no task of ours runs it: a close that failed.
                    continue
                if began.turn_id is not None and asked != began.turn_id:
                    await self.store.set_marker(conversation_id, "cancel", began.turn_id, ttl=CANCEL_TTL)
                    asked = began.turn_id
                if loop.time() >= deadline or not await self._alive(began.owner):
                    take_over = _TakeOver(began.turn_id)
                    continue
                await asyncio.sleep(self.poll_interval)

    async def _in_log(self, conversation_id: str, turn_id: str, delivery: str | None) -> bool:
        """Whether the stored log already holds this turn (a concurrent delete reads as no: `begin` checks again)."""
        try:
            return has_turn(await self.history.messages(conversation_id), turn_id, delivery)
        except LookupError:
            return False

    def _began(self, turn: _Turn, began: _Started, take_over: _TakeOver | None) -> None:
        """Log what beginning a turn decided, and forget a kept reply it stored or made moot."""
        conversation_id = turn.conversation_id
        if began.refused is not None:
            logger.info(
                "interruption_context of turn %s (conversation %s) not taken as it came: %s",
                turn.turn_id,
                conversation_id,
                began.refused,
            )
        kept = take_over.kept if take_over is not None else None
        if kept is not None and self._unclosed.get(conversation_id) is kept:
            # Stored now, or its placeholder was closed otherwise: either way nothing is left to store.
            del self._unclosed[conversation_id]
        if began.recovered is not None:
            logger.info(
                "stored the reply of turn %s (conversation %s), which the store had not taken, before turn %s",
                began.recovered.turn_id,
                conversation_id,
                turn.turn_id,
            )

    def _decide_begin(
        self,
        messages: list[ModelMessage],
        record: ConversationRecord | None,
        turn_id: str,
        delivery: str | None,
        new_messages: list[ModelMessage],
        interruption: InterruptionContext | None,
        take_over: _TakeOver | None,
    ) -> Change[_Started | _Duplicate | _Busy]:
        if has_turn(messages, turn_id, delivery):
            return Change(_Duplicate())
        keep = len(messages)
        replaced: list[ModelMessage] = []
        refused: str | None = None
        recovered: _Unclosed | None = None
        usage: RunUsage | None = None
        barged_in = interruption if interruption is not None and interruption.previous_turn_interrupted else None
        open_reply = pending_reply(messages)
        if open_reply is not None:
            if take_over is None or open_reply.turn_id != take_over.turn_id:
                return Change(_Busy(open_reply.turn_id, open_reply.owner))
            keep = open_reply.index
            heard = barged_in if barged_in and barged_in.assistant_turn_id in {None, open_reply.turn_id} else None
            kept = take_over.kept
            if kept is not None and kept.turn_id == open_reply.turn_id:
                # This worker's reply, which the store did not take: stored now as its turn meant to close.
                closing = list(kept.closing)
                if heard is not None:
                    closing[-1], refused = _rewritten_as_heard(closing[-1], heard)
                replaced = [*closing, *messages[open_reply.index + 1 :]]
                recovered = kept
                if kept.usage is not None:
                    usage = (record.usage if record is not None else RunUsage()) + kept.usage
            else:
                lost, refused = _lost_reply(open_reply.turn_id, take_over.sent, heard)
                replaced = [lost, *messages[open_reply.index + 1 :]]
        elif barged_in is not None:
            reply = last_reply(messages)
            if reply is not None and barged_in.assistant_turn_id in {None, reply.turn_id}:
                keep = reply.index
                rewritten, refused = _rewritten_as_heard(messages[reply.index], barged_in)
                replaced = [rewritten]
        added = [*replaced, *new_messages]
        started = _Started([*messages[:keep], *added], refused=refused, recovered=recovered)
        return Change(started, keep=keep, add=added, usage=usage)

    async def _store_reply(self, turn: _Turn, closing: list[ModelMessage], usage: RunUsage | None) -> None:
        """Close the turn in the store, trying again with backoff for up to `close_retry_for` while it fails.

        After the first failure the caller's stream ends at once (everything was sent), and the reply
        is kept in memory: a repeated delivery is answered from it, and the conversation's next turn
        on this worker stores it first if every try fails.
        """
        conversation_id = turn.conversation_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_retry_for
        kept: _Unclosed | None = None
        pause = _CLOSE_RETRY_FIRST
        attempt = 0
        while True:
            attempt += 1
            try:
                closed = await self._close(turn, closing, usage)
                break
            except StoreError as exc:
                if kept is None:
                    kept = _Unclosed(turn.turn_id, closing, usage)
                    self._keep_unclosed(conversation_id, kept)
                    turn.queue.put_nowait(None)
                    logger.warning(
                        "could not store the reply of turn %s (conversation %s); trying again for up to %g s: %s",
                        turn.turn_id,
                        conversation_id,
                        self.close_retry_for,
                        exc,
                    )
                wait = min(pause, deadline - loop.time())
                if wait <= 0:
                    logger.error(
                        "gave up storing the reply of turn %s (conversation %s) after %d tries: %s; "
                        "the conversation's next turn on this worker stores it first",
                        turn.turn_id,
                        conversation_id,
                        attempt,
                        exc,
                    )
                    return
                await asyncio.sleep(wait)
                pause = min(pause * 2, _CLOSE_RETRY_MAX)
                if self._unclosed.get(conversation_id) is not kept:
                    closed = False  # The next turn took the kept reply over.
                    break
        still_kept = kept is not None and self._unclosed.get(conversation_id) is kept
        if still_kept:
            del self._unclosed[conversation_id]
        if closed:
            turn.timing.mark("history_saved")
            if kept is not None:
                logger.info(
                    "stored the reply of turn %s (conversation %s) at try %d", turn.turn_id, conversation_id, attempt
                )
        elif kept is not None and not still_kept:
            logger.info(
                "the reply of turn %s (conversation %s) was stored by the next turn", turn.turn_id, conversation_id
            )
        else:
            logger.warning(
                "turn %s of conversation %s was closed by another worker first; its reply is not stored",
                turn.turn_id,
                conversation_id,
            )

    def _keep_unclosed(self, conversation_id: str, kept: _Unclosed) -> None:
        """Remember a reply the store did not take, for the conversation's next turn (a bounded number of them)."""
        self._unclosed.pop(conversation_id, None)
        self._unclosed[conversation_id] = kept
        while len(self._unclosed) > _UNCLOSED_LIMIT:
            oldest = next(iter(self._unclosed))
            logger.error(
                "forgot the unstored reply of turn %s (conversation %s)", self._unclosed[oldest].turn_id, oldest
            )
            del self._unclosed[oldest]

    async def _close(self, turn: _Turn, closing: list[ModelMessage], usage: RunUsage | None) -> bool:
        """Replace the turn's placeholder with `closing`, adding `usage` to the conversation's total.

        Returns False if another worker closed it first. Safe to repeat after a failure that was
        written after all: a reply already stored as `closing` says closed.
        """

        def decide(messages: list[ModelMessage], record: ConversationRecord | None) -> Change[bool]:
            reply = find_reply(messages, turn.turn_id)
            if reply is None or reply.status != PENDING or reply.owner != self.owner:
                return Change(reply is not None and _stored_as(reply, closing))
            total = None if usage is None else (record.usage if record is not None else RunUsage()) + usage
            return Change(True, keep=reply.index, add=[*closing, *messages[reply.index + 1 :]], usage=total)

        return await self.history.change(turn.conversation_id, decide, operation="close")

    async def _stored_reply(self, conversation_id: str, turn_id: str) -> str:
        """The reply stored for a turn, once it is no longer streaming (a repeated delivery waits for it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.llm_timeout + self.handover_timeout
        while True:
            local = self._active.get(conversation_id)
            if local is not None and local.turn_id == turn_id:
                await local.finished.wait()
            if (kept := self._unclosed.get(conversation_id)) is not None and kept.turn_id == turn_id:
                return kept.text  # The store has not taken it yet.
            reply = find_reply(await self.history.messages(conversation_id), turn_id)
            if reply is None:
                return ""
            if reply.status != PENDING or loop.time() >= deadline:
                return reply.text
            await asyncio.sleep(self.poll_interval)

    # ------------------------------------------------------------------ workers sharing a store

    async def _heartbeat(self) -> None:
        """Tell other workers this one is alive, at most once per `HEARTBEAT_EVERY`."""
        if not self.store.shared:
            return
        now = asyncio.get_running_loop().time()
        if now - self._heartbeat_at < HEARTBEAT_EVERY:
            return
        self._heartbeat_at = now
        await self.store.set_marker("", f"worker:{self.owner}", "alive", ttl=HEARTBEAT_TTL)

    async def _alive(self, owner: str | None) -> bool:
        if owner is None or not self.store.shared:
            return False
        (beat,) = await self.store.get_markers([("", f"worker:{owner}")])
        return beat is not None

    def _watch(self) -> None:
        """Poll for requests to cancel this worker's turns while it has any (shared stores only)."""
        if self.store.shared and (self._watcher is None or self._watcher.done()):
            self._watcher = self._spawn(self._watch_loop())

    async def _watch_loop(self) -> None:
        failing = False
        while self._active:
            try:
                await self._heartbeat()
                keys = [(conversation_id, "cancel") for conversation_id in self._active]
                for (conversation_id, _), wanted in zip(keys, await self.store.get_markers(keys), strict=True):
                    turn = self._active.get(conversation_id)
                    if wanted is not None and turn is not None and turn.turn_id == wanted:
                        logger.info("turn %s superseded by a newer turn on another worker", wanted)
                        turn.stop()
                if failing:
                    logger.info("checking for cancelled turns works again")
                failing = False
            except StoreError as exc:
                if not failing:  # Once per outage, not every poll.
                    logger.warning("could not check for cancelled turns: %s", exc)
                failing = True
            await asyncio.sleep(self.poll_interval)

    def _lock(self, conversation_id: str) -> _ConversationLock:
        return _ConversationLock(self._locks, conversation_id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ session events

    async def stream_session_start(self, event: SessionStartEvent) -> AsyncIterator[OutboundEvent]:
        """Speak the welcome message (if any) and end the turn; the greeting joins the history once."""
        turn_id = event.turn_id or f"welcome-{event.session_id or event.conversation_key}"
        if self.welcome_message:
            welcome = ModelResponse(
                parts=[TextPart(self.welcome_message)],
                metadata=turn_meta(turn_id, "assistant", COMPLETED, kind="welcome"),
            )
            turn = _Turn(self, event.conversation_key, turn_id)
            try:
                await self._begin(turn, None, [welcome], None)
            except StoreError as exc:
                logger.error("could not store the welcome (conversation %s): %s", event.conversation_key, exc)
            yield TTSResponse(content=self.welcome_message, turn_id=event.turn_id)
        yield EndResponse(turn_id=event.turn_id)

    async def handle_data(self, event: DataEvent, *, delivery: str | None = None) -> DataResponse:
        """Answer client data with the data hook's result; a repeated delivery gets the first answer.

        Raises:
            DeliveryInProgressError: If a repeated delivery's first one, on a worker that is alive, is
                not answered within `llm_timeout`.
        """
        if delivery is None:
            return DataResponse(content=await self.data_handler(event), turn_id=event.turn_id)
        key = (event.conversation_key, f"data:{delivery}")
        answer, _ = await self._claim(key, "data event")
        if answer is not None:
            return DataResponse(content=json.loads(answer), turn_id=event.turn_id)
        try:
            async with self._holding(key):
                content = await self.data_handler(event)
        except BaseException:
            await self.store.delete_marker(*key)  # A retry runs it again.
            raise
        reply = DataResponse(content=content, turn_id=event.turn_id)
        await self.store.set_marker(*key, json.dumps(reply.model_dump(mode="json")["content"]), ttl=DELIVERY_TTL)
        return reply

    async def record_session_event(
        self, event: SessionEndEvent | SessionUpdateEvent, *, delivery: str | None = None
    ) -> bool:
        """Keep Layercode's transcript, metrics and recording details with the conversation, once.

        Returns:
            False if this exact delivery was already recorded.

        Raises:
            DeliveryInProgressError: If the first delivery, on a worker that is alive, is not stored
                within `llm_timeout`.
        """
        conversation_id = event.conversation_key
        payload = event.model_dump(mode="json", exclude_none=True)
        if delivery is None:
            await self.store.add_session_event(conversation_id, event.type, payload, session_id=event.session_id)
            return True
        key = (conversation_id, f"event:{delivery}")
        answer, taken_over = await self._claim(key, f"{event.type} event")
        if answer is not None:
            return False
        try:
            async with self._holding(key):
                # A claimant that died after storing the event, before marking it stored, did store it.
                stored = taken_over and any(
                    kept.event_type == event.type and kept.payload == payload
                    for kept in await self.store.session_events(conversation_id)
                )
                if not stored:
                    await self.store.add_session_event(
                        conversation_id, event.type, payload, session_id=event.session_id
                    )
        except BaseException:
            await self.store.delete_marker(*key)
            raise
        await self.store.set_marker(*key, _RECORDED, ttl=DELIVERY_TTL)
        return not stored

    async def _claim(self, key: tuple[str, str], what: str) -> tuple[str | None, bool]:
        """Claim a delivery, or wait for the answer of the worker that claimed it first.

        A claim whose claimant has no heartbeat, or that lapsed because nobody renewed it, is taken over
        (atomically: of several retries, one wins); a live claimant's answer is waited for, up to `llm_timeout`.

        Returns:
            The first delivery's answer, or `None` once this worker holds the claim; and whether it
            found the delivery claimed by a worker that is gone (or that gave up on it).

        Raises:
            DeliveryInProgressError: If a live claimant did not answer in time.
        """
        mine = f"{_CLAIMED}{self.owner}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.llm_timeout
        await self._heartbeat()  # Seen alive from the moment the claim is ours.
        if (held := await self.store.set_marker(*key, mine, ttl=HEARTBEAT_TTL, only_if_absent=True)) is None:
            return None, False
        while True:
            if held is None:  # The claim lapsed, or its claimant failed and let go: ours if no other retry was first.
                if (held := await self.store.set_marker(*key, mine, ttl=HEARTBEAT_TTL, only_if_absent=True)) is None:
                    return None, True
                continue
            if not _claimed(held):
                return held, False
            claimant = held.removeprefix(_CLAIMED) or None
            if claimant != self.owner and not await self._alive(claimant):
                if await self.store.replace_marker(*key, held, mine, ttl=HEARTBEAT_TTL):
                    logger.warning(
                        "took over a %s delivery of conversation %s from %s, which is gone",
                        what,
                        key[0],
                        claimant or "a worker that did not say who it was",
                    )
                    return None, True
            elif loop.time() >= deadline:
                raise DeliveryInProgressError(
                    f"the first delivery of this {what} (conversation {key[0]}) is still being handled; retry later"
                )
            else:
                await asyncio.sleep(self.poll_interval)
            (held,) = await self.store.get_markers([key])

    @asynccontextmanager
    async def _holding(self, key: tuple[str, str]) -> AsyncGenerator[None]:
        """Keep this worker's claim on a delivery, and its heartbeat, alive while the delivery is handled."""
        mine = f"{_CLAIMED}{self.owner}"

        async def renew() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_EVERY / 2)
                try:
                    await self._heartbeat()
                    if not await self.store.replace_marker(*key, mine, mine, ttl=HEARTBEAT_TTL):
                        logger.warning("another worker took over a delivery of conversation %s", key[0])
                        return
                except StoreError as exc:
                    logger.warning("could not renew the claim on a delivery of conversation %s: %s", key[0], exc)

        renewing = asyncio.get_running_loop().create_task(renew())
        try:
            yield
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    async def repeats_deleted(self, event: InboundEvent, delivery: str) -> bool:
        """Whether the webhook repeats a delivery of a conversation deleted since (`AgentStore.deleted_with`).

        Such a replay must be answered without acting: acting would reopen the conversation. A store that
        cannot tell is taken to say no; the webhook then meets the same store failure where it is handled.
        """
        if isinstance(event, MessageEvent):
            names = [delivery, event.turn_id or delivery]
        elif isinstance(event, SessionStartEvent):  # The welcome's turn, as `stream_session_start` names it.
            names = [event.turn_id or f"welcome-{event.session_id or event.conversation_key}"]
        elif isinstance(event, DataEvent):
            names = [f"data:{delivery}"]
        elif isinstance(event, SessionEndEvent | SessionUpdateEvent):
            names = [f"event:{delivery}"]
        else:
            return False
        try:
            return await self.store.deleted_with(event.conversation_key, names)
        except StoreError as exc:
            logger.warning("could not check whether conversation %s was deleted: %s", event.conversation_key, exc)
            return False

    async def aclose(self) -> None:
        """Stop the turns still running and wait for them (at shutdown).

        Each closes with what was sent and ends its stream with `response.end`. A turn that becomes
        active meanwhile (its webhook came in just before) is stopped too, and each turn only once:
        a second cancellation could reach it while it closes.
        """
        while self._tasks:
            for turn in list(self._active.values()):
                if not turn.stopping:
                    turn.stop()
            done, _ = await asyncio.wait(self._tasks, timeout=self.poll_interval)
            await asyncio.gather(*done, return_exceptions=True)  # Their exceptions are retrieved, not logged.


class _ConversationLock:
    """A per-conversation lock, dropped from the table when nobody holds or waits for it."""

    def __init__(self, table: dict[str, tuple[asyncio.Lock, int]], key: str) -> None:
        self._table = table
        self._key = key

    async def __aenter__(self) -> None:
        lock, users = self._table.get(self._key, (asyncio.Lock(), 0))
        self._table[self._key] = (lock, users + 1)
        await lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        lock, users = self._table[self._key]
        lock.release()
        if users == 1:
            del self._table[self._key]
        else:
            self._table[self._key] = (lock, users - 1)


def _with_filler(message: ModelMessage, filler: str) -> ModelMessage:
    """The reply with the filler spoken before it at the start of its text."""
    if not isinstance(message, ModelResponse):
        return message
    parts = list(message.parts)
    for index, part in enumerate(parts):
        if isinstance(part, TextPart):
            parts[index] = replace(part, content=filler + part.content)
            return replace(message, parts=parts)
    return replace(message, parts=[TextPart(filler.strip()), *parts])


def _claimed(value: str) -> bool:
    """Whether a delivery claim is still being handled (`""` is how earlier versions said so, naming nobody)."""
    return value == "" or value.startswith(_CLAIMED)


def _spent(turn: _Turn) -> RunUsage | None:
    """What a turn's model run used before it was cut short (`None` if it never started)."""
    return copy.copy(turn.usage) if turn.usage is not None else None


def _is_placeholder(messages: list[ModelMessage]) -> bool:
    return bool(messages) and (messages[-1].metadata or {}).get("status") == PENDING


def _rewritten_as_heard(message: ModelMessage, context: InterruptionContext) -> tuple[ModelMessage, str | None]:
    """A reply the caller barged into, rewritten to what they heard of it; and why `text_heard` was refused.

    What was sent is the reply as spoken (`clean_text` of what the model wrote, which is what the
    stream carried), the first time it is rewritten as its `text_sent`.
    """
    if not isinstance(message, ModelResponse):
        return as_heard(message, None), None
    sent = (message.metadata or {}).get("text_sent")
    heard = what_was_heard(clean_text(sent if isinstance(sent, str) else reply_text(message)), *_heard_of(context))
    return as_heard(message, heard.text), heard.refused


def _lost_reply(
    turn_id: str | None, sent: str | None, context: InterruptionContext | None
) -> tuple[ModelResponse, str | None]:
    """The reply of a turn a new turn closes itself: the words its stream sent when this worker knows them.

    Layercode's `interruption_context`, when it speaks of this turn, cuts them to what the caller
    heard; without them, it is all there is to go on.
    """
    meta = turn_meta(turn_id, "assistant", LOST)
    text = sent or ""
    refused: str | None = None
    if context is not None and sent is not None:
        heard = what_was_heard(sent, *_heard_of(context))
        refused = heard.refused
        if heard.text is not None:
            meta["text_sent"] = sent
            meta["text_heard"] = text = heard.text
    elif context is not None and context.text_heard is not None:
        meta["text_heard"] = text = context.text_heard
    return ModelResponse(parts=[TextPart(text)] if text else [], metadata=meta), refused


def _heard_of(context: InterruptionContext) -> tuple[str | None, int | None]:
    return context.text_heard, context.words_heard


def _stored_as(reply: ReplyState, closing: list[ModelMessage]) -> bool:
    """Whether a stored reply is the one `closing` ends with (a close written though the store said it failed)."""
    last = closing[-1]
    return (
        isinstance(last, ModelResponse)
        and reply.status == (last.metadata or {}).get("status")
        and reply.text == reply_text(last)
    )
