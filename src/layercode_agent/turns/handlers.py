"""The webhooks that are not a turn of the model: `session.start`, `data`, `session.end` and `session.update`.

Each delivery is handled once: a repeat gets the first delivery's answer (see `workers` for the
claims that make that hold across workers).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic_ai.messages import ModelResponse, TextPart

from ..history import COMPLETED, turn_meta
from ..protocol import (
    DataEvent,
    DataResponse,
    EndResponse,
    InboundEvent,
    MessageEvent,
    OutboundEvent,
    SessionEndEvent,
    SessionStartEvent,
    SessionUpdateEvent,
    TTSResponse,
)
from ..stores import AgentStore, DeliveryCheck, StoreError
from .workers import DELIVERY_TTL, RECORDED, Workers

__all__ = ["DataHandler", "SessionHandlers", "default_data_handler", "welcome_turn_id"]

logger = logging.getLogger("layercode_agent.turns")

_UNKNOWN = DeliveryCheck(deleted=False, revision=None)
"""What a webhook the store cannot check (or that has no delivery names) is taken to be."""

DataHandler = Callable[[DataEvent], Awaitable[Any]]
"""Answers a `data` webhook; its return value becomes the `content` of the `response.data` reply."""


async def default_data_handler(event: DataEvent) -> Any:
    """Acknowledge client data; replace it with `DATA_HANDLER=module:function` or `create_app(data_handler=...)`."""
    return {"status": "ok"}


def welcome_turn_id(event: SessionStartEvent) -> str:
    """The turn the welcome of a session is stored as."""
    return event.turn_id or f"welcome-{event.session_id or event.conversation_key}"


class SessionHandlers:
    """Answers the webhooks around the turns."""

    def __init__(
        self,
        store: AgentStore,
        workers: Workers,
        *,
        data_handler: DataHandler,
        welcome_message: str,
        store_welcome: Callable[[str, str, ModelResponse], Awaitable[object]],
        claim_timeout: float,
    ) -> None:
        """Create the handlers.

        Args:
            store: Where conversations and their session events are kept.
            workers: This worker's claims on deliveries.
            data_handler: Answers `data` webhooks.
            welcome_message: Spoken on `session.start`; empty for none.
            store_welcome: Adds the welcome to a conversation's log (conversation, turn, message), once.
            claim_timeout: How long a repeated delivery waits for the first one's answer.
        """
        self.store = store
        self.workers = workers
        self.data_handler = data_handler
        self.welcome_message = welcome_message
        self._store_welcome = store_welcome
        self.claim_timeout = claim_timeout

    async def stream_session_start(self, event: SessionStartEvent) -> AsyncIterator[OutboundEvent]:
        """Speak the welcome message (if any) and end the turn; the greeting joins the history once."""
        turn_id = welcome_turn_id(event)
        if self.welcome_message:
            welcome = ModelResponse(
                parts=[TextPart(self.welcome_message)],
                metadata=turn_meta(turn_id, "assistant", COMPLETED, kind="welcome"),
            )
            try:
                await self._store_welcome(event.conversation_key, turn_id, welcome)
            except StoreError as exc:
                logger.error("could not store the welcome (conversation %s): %s", event.conversation_key, exc)
            yield TTSResponse(content=self.welcome_message, turn_id=event.turn_id)
        yield EndResponse(turn_id=event.turn_id)

    async def handle_data(self, event: DataEvent, *, delivery: str | None = None) -> DataResponse:
        """Answer client data with the data hook's result; a repeated delivery gets the first answer.

        Raises:
            DeliveryInProgressError: If a repeated delivery's first one, on a worker that is alive, is
                not answered within the claim timeout.
        """
        if delivery is None:
            return DataResponse(content=await self.data_handler(event), turn_id=event.turn_id)
        key = (event.conversation_key, f"data:{delivery}")
        answer, _ = await self.workers.claim(key, "data event", self.claim_timeout)
        if answer is not None:
            return DataResponse(content=json.loads(answer), turn_id=event.turn_id)
        try:
            async with self.workers.holding(key):
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
                within the claim timeout.
        """
        conversation_id = event.conversation_key
        payload = event.model_dump(mode="json", exclude_none=True)
        if delivery is None:
            await self.store.add_session_event(conversation_id, event.type, payload, session_id=event.session_id)
            return True
        key = (conversation_id, f"event:{delivery}")
        answer, taken_over = await self.workers.claim(key, f"{event.type} event", self.claim_timeout)
        if answer is not None:
            return False
        try:
            async with self.workers.holding(key):
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
        await self.store.set_marker(*key, RECORDED, ttl=DELIVERY_TTL)
        return not stored

    async def check_delivery(self, event: InboundEvent, delivery: str) -> DeliveryCheck:
        """Whether the webhook repeats a delivery of a conversation deleted since, and its record's revision now.

        A replay of a deleted conversation must be answered without acting: acting would reopen it
        (`AgentStore.delivery_check`). A store that cannot tell is taken to say no (and no revision); the
        webhook then meets the same store failure where it is handled.
        """
        if isinstance(event, MessageEvent):
            names = [delivery, event.turn_id or delivery]
        elif isinstance(event, SessionStartEvent):  # The welcome's turn.
            names = [welcome_turn_id(event)]
        elif isinstance(event, DataEvent):
            names = [f"data:{delivery}"]
        elif isinstance(event, SessionEndEvent | SessionUpdateEvent):
            names = [f"event:{delivery}"]
        else:
            return _UNKNOWN
        try:
            return await self.store.delivery_check(event.conversation_key, names)
        except StoreError as exc:
            logger.warning("could not check whether conversation %s was deleted: %s", event.conversation_key, exc)
            return _UNKNOWN
