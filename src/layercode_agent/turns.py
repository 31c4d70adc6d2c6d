"""The use case: one webhook in, the events to stream back out, and the conversation kept true.

This is the only module that combines the Layercode protocol, the agent and the store. For a
`message` it stores the caller's words first, then streams the agent's reply as `response.tts`
deltas the moment the model yields them, and always ends with exactly one `response.end`:
- the model fails, times out or returns garbage: a spoken apology, then `response.end`;
- the caller hangs up or barges in (Layercode aborts the request): the generator is closed, the
  run is cancelled, and the words already sent are saved by a shielded write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic_ai import AgentRunResultEvent
from pydantic_ai.agent import AbstractAgent
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationConflict
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
    UserPromptPart,
)
from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings

from .agent import APOLOGY, TOOL_FILLER, CallContext, VoiceTextCleaner
from .protocol import (
    DataEvent,
    DataResponse,
    EndResponse,
    MessageEvent,
    OutboundEvent,
    SessionEndEvent,
    SessionStartEvent,
    SessionUpdateEvent,
    TTSResponse,
)
from .stores import AgentStore, StoreError

__all__ = ["DataHandler", "TurnRunner", "TurnTiming", "default_data_handler"]

logger = logging.getLogger("layercode_agent.turns")

DataHandler = Callable[[DataEvent], Awaitable[Any]]
"""Answers a `data` webhook; its return value becomes the `content` of the `response.data` reply."""

_SAVE_ATTEMPTS = 8


async def default_data_handler(event: DataEvent) -> Any:
    """Acknowledge client data; replace it with `DATA_HANDLER=module:function` or `create_app(data_handler=...)`."""
    return {"status": "ok"}


@dataclass
class TurnTiming:
    """Milliseconds from the start of a turn to each stage, for the per-turn log line."""

    started: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict[str, float])

    def mark(self, stage: str) -> None:
        """Record a stage once (the first time it happens)."""
        self.stages.setdefault(stage, round((time.perf_counter() - self.started) * 1000, 2))


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
    ) -> None:
        self.agent = agent
        self.store = store
        self.model = model
        self.model_settings = model_settings
        self.welcome_message = welcome_message
        self.llm_timeout = llm_timeout
        self.data_handler = data_handler
        self.apology = apology
        self.tool_filler = tool_filler
        # A background save is kept referenced until it finishes (RUF006).
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ message

    async def stream_message(self, event: MessageEvent) -> AsyncIterator[OutboundEvent]:
        """Store the caller's words, then stream the reply; always ends with one `response.end`."""
        turn_id = event.turn_id
        timing = TurnTiming()
        outcome = "completed"
        try:
            user_message = ModelRequest(parts=[UserPromptPart(event.text)], metadata=_turn_meta(turn_id, "user"))
            try:
                conversation = await self._append(event.conversation_key, [user_message])
            except StoreError:
                logger.exception("could not store the caller's message (conversation %s)", event.conversation_key)
                outcome = "failed"
                yield TTSResponse(content=self.apology, turn_id=turn_id)
                return
            timing.mark("history_saved")
            async for out in self._reply(conversation, event, timing):
                if isinstance(out, str):
                    outcome = out
                else:
                    yield out
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "interrupted"
            raise
        finally:
            timing.mark("end")
            logger.info(
                "turn %s conversation=%s turn=%s stages=%s",
                outcome,
                event.conversation_key,
                turn_id,
                timing.stages,
            )
        yield EndResponse(turn_id=turn_id)

    async def _reply(
        self, conversation: Conversation, event: MessageEvent, timing: TurnTiming
    ) -> AsyncIterator[OutboundEvent | str]:
        """Stream the agent's reply; yields the outcome as a plain string last."""
        turn_id = event.turn_id
        spoken: list[str] = []
        cleaner = VoiceTextCleaner()
        spoke_since_request = False
        finished = False
        deps = CallContext(
            conversation_id=event.conversation_key,
            turn_id=turn_id,
            session_id=event.session_id,
            from_phone_number=event.from_phone_number,
            to_phone_number=event.to_phone_number,
            metadata=event.all_metadata,
        )
        try:
            async with self.agent.run_stream_events(
                conversation=conversation,
                deps=deps,
                model=self.model,
                model_settings=self.model_settings,
                timeout=self.llm_timeout,
            ) as events:
                timing.mark("llm_request")
                async for agent_event in events:
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
                        text = cleaner.flush()
                        if text:
                            spoken.append(text)
                            yield TTSResponse(content=text, turn_id=turn_id)
                        if not spoke_since_request and self.tool_filler:
                            spoken.append(self.tool_filler + " ")
                            yield TTSResponse(content=self.tool_filler, turn_id=turn_id)
                        yield DataResponse(
                            content={"tool": agent_event.part.tool_name, "status": "running"}, turn_id=turn_id
                        )
                        spoke_since_request = False
                        continue
                    elif isinstance(agent_event, FunctionToolResultEvent):
                        yield DataResponse(
                            content={"tool": agent_event.part.tool_name, "status": "done"}, turn_id=turn_id
                        )
                        continue
                    elif isinstance(agent_event, AgentRunResultEvent):
                        result = agent_event.result
                        text = cleaner.flush()
                        if text:
                            spoken.append(text)
                            yield TTSResponse(content=text, turn_id=turn_id)
                        timing.mark("llm_done")
                        finished = True
                        await self._save_result(conversation, result.conversation, result.new_messages(), turn_id)
                        timing.mark("history_saved_reply")
                        yield "completed"
                        return
                    if text:
                        if not spoken:
                            timing.mark("first_tts")
                        spoken.append(text)
                        spoke_since_request = True
                        yield TTSResponse(content=text, turn_id=turn_id)
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                self._save_in_background(conversation.conversation_id, "".join(spoken), turn_id, "interrupted")
            raise
        except Exception as exc:
            logger.error(
                "LLM failed in conversation %s turn %s: %s: %s",
                conversation.conversation_id,
                turn_id,
                type(exc).__name__,
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            apology = (" " if spoken else "") + self.apology
            spoken.append(apology)
            yield TTSResponse(content=apology, turn_id=turn_id)
            try:
                await self._append(conversation.conversation_id, [_assistant("".join(spoken), turn_id, "failed")])
            except StoreError:
                logger.exception("could not store the apology (conversation %s)", conversation.conversation_id)
            yield "failed"

    # ------------------------------------------------------------------ session events

    async def stream_session_start(self, event: SessionStartEvent) -> AsyncIterator[OutboundEvent]:
        """Speak the welcome message (if any) and end the turn; the greeting joins the history."""
        if self.welcome_message:
            yield TTSResponse(content=self.welcome_message, turn_id=event.turn_id)
            try:
                await self._append(
                    event.conversation_key, [_assistant(self.welcome_message, event.turn_id, "completed")]
                )
            except StoreError:
                logger.exception("could not store the welcome (conversation %s)", event.conversation_key)
        yield EndResponse(turn_id=event.turn_id)

    async def handle_data(self, event: DataEvent) -> DataResponse:
        """Answer client data with the data hook's result."""
        content = await self.data_handler(event)
        return DataResponse(content=content, turn_id=event.turn_id)

    async def record_session_event(self, event: SessionEndEvent | SessionUpdateEvent) -> None:
        """Keep Layercode's transcript, metrics and recording details with the conversation."""
        payload = event.model_dump(mode="json", exclude_none=True)
        await self.store.add_session_event(event.conversation_key, event.type, payload, session_id=event.session_id)

    async def aclose(self) -> None:
        """Wait for saves still running in the background (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # ------------------------------------------------------------------ history

    async def _append(self, conversation_id: str, messages: Sequence[ModelMessage]) -> Conversation:
        """Append messages to the stored conversation, retrying when another writer saved in between."""
        for _ in range(_SAVE_ATTEMPTS):
            conversation = await self.store.load(conversation_id) or Conversation(conversation_id=conversation_id)
            conversation.messages.extend(messages)
            try:
                await self.store.save(conversation)
            except ConversationConflict:
                continue
            return conversation
        raise StoreError(f"conversation {conversation_id!r} kept changing while saving; gave up after retries")

    async def _save_result(
        self, before: Conversation, after: Conversation, new_messages: list[ModelMessage], turn_id: str | None
    ) -> None:
        """Save a finished run; mark its final response with the turn it answers."""
        for message in reversed(new_messages):
            if isinstance(message, ModelResponse):
                message.metadata = {**(message.metadata or {}), **_turn_meta(turn_id, "assistant", "completed")}
                break
        try:
            try:
                await self.store.save(after)
            except ConversationConflict:
                await self._append(before.conversation_id, new_messages)
        except StoreError:
            logger.exception("could not store the reply (conversation %s)", before.conversation_id)

    def _save_in_background(self, conversation_id: str, text: str, turn_id: str | None, status: str) -> None:
        """Save what was spoken of a turn the caller cut off; survives the request's cancellation."""
        if not text:
            return

        async def save() -> None:
            try:
                await self._append(conversation_id, [_assistant(text, turn_id, status)])
            except Exception:
                logger.exception("could not store the interrupted reply (conversation %s)", conversation_id)

        task = asyncio.get_running_loop().create_task(save())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _turn_meta(turn_id: str | None, role: str, status: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"turn_id": turn_id, "role": role}
    if status is not None:
        meta["status"] = status
    return meta


def _assistant(text: str, turn_id: str | None, status: str) -> ModelResponse:
    return ModelResponse(parts=[TextPart(text)], metadata=_turn_meta(turn_id, "assistant", status))
