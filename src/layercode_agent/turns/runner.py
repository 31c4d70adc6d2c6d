"""The turn runner: composes a turn's state, the agent's events, the record and the other workers.

A `message` runs as a turn in its own task, which the HTTP response only reads from:

1. **Begin**, atomically (see `history.decide_begin`): a duplicate delivery of a turn streaming here
   or already in the log gets the stored reply instead of a second LLM call, and is recognised
   before anything else, so it never touches another turn; a turn still streaming for the same
   conversation is stopped and closed first (latest turn wins), here or on another worker; the
   reply the caller barged into becomes what they heard; then the caller's words and an assistant
   placeholder are stored, all before the model is asked anything.
2. **Answer**: stream the agent's reply as `response.tts` deltas the moment the model yields them
   (see `adapter`). The run's usage limits apply to this turn alone; the conversation's total is
   kept in the store.
3. **Close** the placeholder whatever happens: the full reply; the words already sent if the caller
   hung up or barged in (the task is cancelled, so no tool runs after the abort, and only finished
   tool calls are kept); a spoken apology if the model failed. Every stream ends with one
   `response.end`. A close the store fails is tried again for a while, then left to the
   conversation's next turn on this worker, which stores it first.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import secrets
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from contextlib import aclosing
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from pydantic_ai.agent import AbstractAgent, AgentRun
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationRecord
from pydantic_ai.messages import AgentStreamEvent, ModelMessage, ModelRequest, ModelResponse, UserPromptPart
from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RunUsage, UsageLimits

from ..agent import (
    APOLOGY,
    DIRECT_TEXT,
    EARLY_REQUEST,
    INTERRUPTED_MARK,
    SLOW_FILLER,
    TOOL_FILLER,
    CallContext,
    ChatCompletionsModel,
    EarlyRequest,
    clean_text,
)
from ..history import (
    FAILED,
    INTERRUPTED,
    PENDING,
    Busy,
    Change,
    Duplicate,
    History,
    Started,
    TakeOver,
    Unclosed,
    closing_messages,
    decide_begin,
    decide_close,
    find_reply,
    has_turn,
    is_placeholder,
    llm_messages,
    result_messages,
    turn_meta,
    with_filler,
)
from ..protocol import (
    DataResponse,
    InterruptionContext,
    MessageEvent,
    OutboundEvent,
    TTSResponse,
)
from ..stores import AgentStore, DeliveryCheck, StoreError
from .adapter import ReplyAdapter
from .handlers import DataHandler, SessionHandlers, default_data_handler
from .state import Phase, Turn
from .timing import Stage, TurnObserver, TurnReport, TurnTiming
from .workers import Workers

__all__ = ["TurnRunner"]

logger = logging.getLogger("layercode_agent.turns")

_CLOSE_RETRY_FIRST = 0.05
_CLOSE_RETRY_MAX = 1.0
"""Seconds between tries to store a reply the store failed to take: doubling from the first to the most."""
_UNCLOSED_LIMIT = 1000
"""Replies the store did not take that a worker keeps for their conversations' next turns, at most."""
_KNOWN_LIMIT = 1000
"""Conversations whose log, as this worker's last close left it, a worker keeps for the next turn's early request."""


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
        self._active: dict[str, Turn] = {}
        self._unclosed: dict[str, Unclosed] = {}
        """Per conversation, the reply of this worker the store did not take (at most one: the newest turn's)."""
        self._known: dict[str, tuple[str, list[ModelMessage]]] = {}
        """Per conversation, its log as this worker's last close of it left it, and the revision that wrote it."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.workers = Workers(
            store, owner=self.owner, poll_interval=poll_interval, active=self._active, spawn=self._spawn
        )
        self.sessions = SessionHandlers(
            store,
            self.workers,
            data_handler=data_handler,
            welcome_message=welcome_message,
            store_welcome=self._store_welcome,
            claim_timeout=llm_timeout,
        )

    # ------------------------------------------------------------------ the webhooks around turns
    # `session.start`, `data`, `session.*` and the delivery check are `self.sessions`' (`SessionHandlers`).

    async def _store_welcome(self, conversation_id: str, turn_id: str, welcome: ModelResponse) -> None:
        await self._begin(self._turn(conversation_id, turn_id), None, [welcome], None)

    # ------------------------------------------------------------------ message

    def stream_message(
        self,
        event: MessageEvent,
        *,
        delivery: str | None = None,
        timing: TurnTiming | None = None,
        early: EarlyRequest | None = None,
    ) -> AsyncGenerator[OutboundEvent]:
        """Answer a `message`: the reply's events as they come, ending with one `response.end`.

        Args:
            event: The webhook.
            delivery: A digest of the signed body, to recognise the same delivery without a `turn_id`.
            timing: Started when the webhook arrived (with `signature_verified` marked), if the caller has one.
            early: What `guess_early` sent for this webhook; the turn takes it over (and closes it if unused).
        """
        turn_id = event.turn_id or delivery or f"local-{secrets.token_hex(8)}"
        turn = self._turn(event.conversation_key, turn_id, timing)
        turn.task = self._spawn(self._run_turn(turn, event, delivery, early))
        return turn.events()

    async def guess_early(self, event: MessageEvent, check: DeliveryCheck, delivery: str) -> EarlyRequest | None:
        """Send now the request a `message`'s turn will most likely make first (`ChatCompletionsModel.open_early`).

        For a webhook verified and checked (`sessions.check_delivery`), before its turn is begun in the store: the
        turn takes it over (`stream_message(early=...)`) or it is closed (`EarlyRequest.discard()`). The
        history it goes by is the conversation's log as this worker's last close of it left it, plus the
        caller's words: what beginning the turn reads back in the common case. So only when the record's
        revision is still the one that close wrote (no other worker, delete or repair came in between),
        no turn of the conversation is still streaming here (a barge-in: its close changes the log), the
        message carries no interruption context (the begin would change what the caller heard), and the
        log does not hold its turn already: a repeated or replayed delivery never reaches the LLM. The
        agent's request takes it only if it is byte for byte its own; otherwise it is closed at once.
        """
        model = self.model
        if (
            not isinstance(model, ChatCompletionsModel)
            or event.interruption_context is not None
            or event.conversation_key in self._active
            or (known := self._known.get(event.conversation_key)) is None
            or known[0] != check.revision
            or has_turn(known[1], event.turn_id or delivery, delivery)
        ):
            return None
        said = ModelRequest(parts=[UserPromptPart(event.text)])
        return await model.open_early(llm_messages([*known[1], said], self.interrupted_mark))

    def _turn(self, conversation_id: str, turn_id: str, timing: TurnTiming | None = None) -> Turn:
        return Turn(conversation_id, turn_id, timing, observer=self.observer, report=self.report)

    async def _run_turn(
        self, turn: Turn, event: MessageEvent, delivery: str | None, early: EarlyRequest | None
    ) -> None:
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
            timing.mark(Stage.HISTORY_LOADED)
            if isinstance(began, Duplicate):
                turn.outcome = "duplicate"
                # Stored as the model wrote it; spoken as the first delivery was, without markdown.
                text = clean_text(await self._stored_reply(turn.conversation_id, turn.turn_id))
                if text:
                    put(TTSResponse(content=text, turn_id=turn.turn_id))
                return
            closing, usage = await self._answer(turn, began, event, early)
            if (revision := await self._store_reply(turn, closing, usage)) is not None:
                self._remember(turn.conversation_id, revision, [*began.messages[:-1], *closing])
        except Exception:
            logger.exception("turn %s of conversation %s failed", turn.turn_id, turn.conversation_id)
            turn.outcome = FAILED
            put(TTSResponse(content=self.apology, turn_id=turn.turn_id))
        finally:
            if early is not None:
                early.discard()  # Unless the run took it: a duplicate, a failed begin, a stop before the model.
            turn.queue.put_nowait(None)
            turn.enter(Phase.FINISHED)
            if self._active.get(turn.conversation_id) is turn:
                del self._active[turn.conversation_id]
            turn.maybe_report()

    def _remember(self, conversation_id: str, revision: str, log: list[ModelMessage]) -> None:
        """Keep the log a close of this worker wrote, for the conversation's next turn (a bounded number of them)."""
        self._known.pop(conversation_id, None)
        self._known[conversation_id] = (revision, log)
        if len(self._known) > _KNOWN_LIMIT:
            del self._known[next(iter(self._known))]

    def report(self, turn: Turn) -> None:
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
        self, turn: Turn, began: Started, event: MessageEvent, early: EarlyRequest | None = None
    ) -> tuple[list[ModelMessage], RunUsage | None]:
        """Stream the agent's reply into the turn's queue; returns the messages that close the turn.

        `early` is the request `guess_early` sent before the turn began, if it did.
        """
        put = turn.queue.put_nowait
        turn_id = turn.turn_id
        produced: list[str] = []

        def emit(out: TTSResponse) -> None:
            produced.append(out.content)
            put(out)

        adapter = ReplyAdapter(turn_id, turn.timing, self.tool_filler, emit)

        if turn.stop_requested:  # The caller left (or a newer turn came) before the model was asked.
            turn.enter(Phase.CLOSING)
            turn.outcome = INTERRUPTED
            return closing_messages(turn_id, adapter.finished_calls, "", INTERRUPTED), None
        # No usage carried in: pydantic-ai checks `usage_limits` against the run's usage, which starts from
        # the one it is given, so the conversation's running total would count against every turn (and,
        # past 50 requests, fail each one). The close adds this turn's usage to the stored total instead.
        conversation = Conversation(
            messages=llm_messages(began.messages[:-1], self.interrupted_mark),
            conversation_id=turn.conversation_id,
        )
        turn.enter(Phase.ANSWERING)
        filler: list[str] = []

        def speak_filler() -> None:
            # The model has been silent for `filler_after_ms`: say something rather than leave a silence.
            if not produced and turn.answering:
                filler.append(f"{self.slow_filler} ")
                produced.append(filler[0])
                put(TTSResponse(content=filler[0], turn_id=turn_id))

        timer = (
            asyncio.get_running_loop().call_later(self.filler_after_ms / 1000, speak_filler)
            if self.filler_after_ms is not None and self.slow_filler
            else None
        )
        # The request the agent's first one will most likely be goes out now (unless it went out before the turn
        # began), while the agent sets its run up.
        model = self.model
        if early is None and isinstance(model, ChatCompletionsModel):
            early = await model.open_early(conversation.messages)
        early_token = EARLY_REQUEST.set(early)
        try:
            # Closed here, in this task: the run's context managers must exit in the context they entered.
            async with aclosing(self._reply(conversation, event, turn, adapter)) as replies:
                async for out in replies:
                    if isinstance(out, TTSResponse):
                        produced.append(out.content)
                        put(out)
                    elif isinstance(out, DataResponse):
                        put(out)
                    else:
                        messages, usage = out
                        turn.enter(Phase.CLOSING)
                        if filler:  # The caller heard it: it belongs to the reply.
                            messages[-1] = with_filler(messages[-1], filler[0])
                        return messages, usage
            raise RuntimeError("the agent run ended without a result")
        except asyncio.CancelledError:
            turn.enter(Phase.CLOSING)
            # What is still queued never reached the caller: drop it and keep what was sent.
            turn.drop_queued()
            turn.outcome = INTERRUPTED
            return closing_messages(turn_id, adapter.finished_calls, "".join(turn.sent), INTERRUPTED), turn.spent()
        except Exception as exc:
            turn.enter(Phase.CLOSING)
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
            text = "".join(produced) + apology
            return closing_messages(turn_id, adapter.finished_calls, text, FAILED), turn.spent()
        finally:
            EARLY_REQUEST.reset(early_token)
            if early is not None:
                early.discard()
            if timer is not None:
                timer.cancel()

    async def _reply(
        self, conversation: Conversation, event: MessageEvent, turn: Turn, adapter: ReplyAdapter
    ) -> AsyncGenerator[TTSResponse | DataResponse | tuple[list[ModelMessage], RunUsage]]:
        """The agent's reply as events; the messages that close the turn and this turn's usage come last."""
        timing = turn.timing
        deps = CallContext(
            conversation_id=turn.conversation_id,
            turn_id=turn.turn_id,
            session_id=event.session_id,
            from_phone_number=event.from_phone_number,
            to_phone_number=event.to_phone_number,
            metadata=event.all_metadata,
        )
        convert = adapter.convert
        async with self.agent.iter(
            conversation=conversation,
            deps=deps,
            model=self.model,
            model_settings=self.model_settings,
            usage_limits=self.usage_limits,
            timeout=self.llm_timeout,
        ) as run:
            turn.usage = run.usage
            async for agent_event in self._run_events(run, adapter):
                for out in convert(agent_event):
                    yield out
            for out in adapter.flush():
                yield out
            timing.mark(Stage.LLM_LAST_TOKEN)
            result = run.result
            if result is None:
                raise RuntimeError("the agent run ended without a result")
            yield result_messages(result.new_messages(), turn.turn_id, self.interrupted_mark), copy.copy(result.usage)

    async def _run_events(self, run: AgentRun[Any, Any], adapter: ReplyAdapter) -> AsyncIterator[AgentStreamEvent]:
        """The run's model and tool events, read in this task.

        `agent.iter` with each node's own stream, rather than `run_stream_events`, which runs the
        agent in a second task and hands every token across a memory stream. While a model request
        streams (and only then: a tool's sub-agent must not speak), a `ChatCompletionsModel` hands
        each text delta to the adapter at once (`agent.DIRECT_TEXT`) instead of through the run.
        """
        timing = adapter.timing
        async for node in run:
            if self.agent.is_model_request_node(node):
                adapter.new_response()
                direct = DIRECT_TEXT.set(adapter.direct_text)
                try:
                    async with node.stream(run.ctx) as stream:
                        timing.mark(Stage.LLM_REQUEST)
                        async for event in stream:
                            yield event
                finally:
                    DIRECT_TEXT.reset(direct)
                    # If the model took the request sent early, the request left when that one did (known only now).
                    early = EARLY_REQUEST.get()
                    if early is not None and early.used and early.sent_at is not None:
                        timing.restate(Stage.LLM_REQUEST, early.sent_at)
            elif self.agent.is_call_tools_node(node):
                async with node.stream(run.ctx) as stream:
                    async for event in stream:
                        yield event

    # ------------------------------------------------------------------ beginning and closing turns

    async def _begin(
        self,
        turn: Turn,
        delivery: str | None,
        new_messages: list[ModelMessage],
        interruption: InterruptionContext | None,
    ) -> Started | Duplicate:
        """Add a turn's first messages to the log, after closing whatever turn is still open there.

        A repeated delivery is recognised before anything else (its turn streams here, or the log has
        it), so it never stops another turn, asks another worker to stop one, or changes the log.
        """
        conversation_id = turn.conversation_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handover_timeout
        asked: str | None = None
        take_over: TakeOver | None = None
        workers = self.workers
        await workers.heartbeat()
        async with workers.lock(conversation_id):
            while True:
                local = self._active.get(conversation_id)
                if local is not None and local is not turn:
                    if local.turn_id == turn.turn_id or await self._in_log(conversation_id, turn.turn_id, delivery):
                        return Duplicate()  # A repeat of the turn streaming, or of an earlier one.
                    local.stop()  # Latest turn wins.
                    try:
                        await asyncio.wait_for(local.finished.wait(), max(deadline - loop.time(), 0.1))
                    except TimeoutError:
                        logger.warning("turn %s did not close in time; taking it over", local.turn_id)
                        take_over = TakeOver(local.turn_id, sent="".join(local.sent))
                        del self._active[conversation_id]
                    continue
                if take_over is not None and (kept := self._unclosed.get(conversation_id)) is not None:
                    take_over = replace(take_over, kept=kept)

                def decide(
                    messages: list[ModelMessage],
                    record: ConversationRecord | None,
                    take_over: TakeOver | None = take_over,
                ) -> Change[Started | Duplicate | Busy]:
                    return decide_begin(
                        messages,
                        record,
                        turn_id=turn.turn_id,
                        delivery=delivery,
                        new_messages=new_messages,
                        interruption=interruption,
                        take_over=take_over,
                        spoken=clean_text,
                    )

                began = await self.history.change(conversation_id, decide, operation="begin")
                if isinstance(began, Started):
                    self._began(turn, began, take_over)
                    if is_placeholder(new_messages):
                        self._active[conversation_id] = turn
                        workers.watch()
                    return began
                if isinstance(began, Duplicate):
                    return began
                # Another worker's turn is still open: ask it to stop, and take it over if its worker is gone.
                # (The same read found this turn absent from the log: a duplicate never gets here.)
                if began.owner == self.owner:
                    take_over = TakeOver(began.turn_id)  # Ours, but no task of ours runs it: a close that failed.
                    continue
                if began.turn_id is not None and asked != began.turn_id:
                    await workers.ask_to_cancel(conversation_id, began.turn_id)
                    asked = began.turn_id
                if loop.time() >= deadline or not await workers.alive(began.owner):
                    take_over = TakeOver(began.turn_id)
                    continue
                await asyncio.sleep(self.poll_interval)

    async def _in_log(self, conversation_id: str, turn_id: str, delivery: str | None) -> bool:
        """Whether the stored log already holds this turn (a concurrent delete reads as no: `begin` checks again)."""
        try:
            return has_turn(await self.history.messages(conversation_id), turn_id, delivery)
        except LookupError:
            return False

    def _began(self, turn: Turn, began: Started, take_over: TakeOver | None) -> None:
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

    async def _store_reply(self, turn: Turn, closing: list[ModelMessage], usage: RunUsage | None) -> str | None:
        """Close the turn in the store, trying again with backoff for up to `close_retry_for` while it fails.

        Returns the revision of the record the close wrote, if this turn's first try stored it (`None` for
        a reply stored later, or by the next turn, or not at all: the log may no longer end with it).

        After the first failure the caller's stream ends at once (everything was sent), and the reply
        is kept in memory: a repeated delivery is answered from it, and the conversation's next turn
        on this worker stores it first if every try fails.
        """
        conversation_id = turn.conversation_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_retry_for
        kept: Unclosed | None = None
        pause = _CLOSE_RETRY_FIRST
        attempt = 0
        revision: str | None = None
        while True:
            attempt += 1
            try:
                closed, revision = await self._close(turn, closing, usage)
                break
            except StoreError as exc:
                if kept is None:
                    kept = Unclosed(turn.turn_id, closing, usage)
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
                    return None
                await asyncio.sleep(wait)
                pause = min(pause * 2, _CLOSE_RETRY_MAX)
                if self._unclosed.get(conversation_id) is not kept:
                    closed = False  # The next turn took the kept reply over.
                    break
        still_kept = kept is not None and self._unclosed.get(conversation_id) is kept
        if still_kept:
            del self._unclosed[conversation_id]
        if closed:
            turn.timing.mark(Stage.HISTORY_SAVED)
            if kept is not None:
                logger.info(
                    "stored the reply of turn %s (conversation %s) at try %d", turn.turn_id, conversation_id, attempt
                )
            return revision if kept is None else None
        if kept is not None and not still_kept:
            logger.info(
                "the reply of turn %s (conversation %s) was stored by the next turn", turn.turn_id, conversation_id
            )
        else:
            logger.warning(
                "turn %s of conversation %s was closed by another worker first; its reply is not stored",
                turn.turn_id,
                conversation_id,
            )
        return None

    def _keep_unclosed(self, conversation_id: str, kept: Unclosed) -> None:
        """Remember a reply the store did not take, for the conversation's next turn (a bounded number of them)."""
        self._unclosed.pop(conversation_id, None)
        self._unclosed[conversation_id] = kept
        while len(self._unclosed) > _UNCLOSED_LIMIT:
            oldest = next(iter(self._unclosed))
            logger.error(
                "forgot the unstored reply of turn %s (conversation %s)", self._unclosed[oldest].turn_id, oldest
            )
            del self._unclosed[oldest]

    async def _close(self, turn: Turn, closing: list[ModelMessage], usage: RunUsage | None) -> tuple[bool, str | None]:
        """Replace the turn's placeholder with `closing` (see `history.decide_close`); False if another worker did.

        With it, the revision of the record it wrote.
        """

        def decide(messages: list[ModelMessage], record: ConversationRecord | None) -> Change[bool]:
            return decide_close(messages, record, turn_id=turn.turn_id, owner=self.owner, closing=closing, usage=usage)

        closed, write = await self.history.change_written(turn.conversation_id, decide, operation="close")
        return closed, write.record.revision if write is not None else None

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

    # ------------------------------------------------------------------ tasks and shutdown

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        """Stop the turns still running and wait for them (at shutdown).

        Each closes with what was sent and ends its stream with `response.end`. A turn that becomes
        active meanwhile (its webhook came in just before) is stopped too, and each turn only once:
        a second cancellation could reach it while it closes.
        """
        while self._tasks:
            for turn in list(self._active.values()):
                if not turn.stop_requested:
                    turn.stop()
            done, _ = await asyncio.wait(self._tasks, timeout=self.poll_interval)
            await asyncio.gather(*done, return_exceptions=True)  # Their exceptions are retrieved, not logged.
