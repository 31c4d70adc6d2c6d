"""The in-process store: pydantic-ai's `InMemoryConversationStore` plus session events.

For tests, the playground and single-process development. Nothing survives a restart and nothing is
shared between workers, which is why the start-up banner says so.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic_ai.conversation_store import InMemoryConversationStore

from ._serialization import dump_payload, load_payload
from .base import AgentStore, SessionEventRecord

__all__ = ["MemoryStore"]


class MemoryStore(InMemoryConversationStore, AgentStore):
    """Keeps conversations and their session events in this process's memory.

    Deleting a conversation deletes its session events and the messages no other conversation's
    history (a fork, a branch) still reaches.
    """

    def __init__(self) -> None:
        super().__init__()
        self._session_events: dict[str, list[SessionEventRecord]] = {}

    @property
    def description(self) -> str:
        """Human text for the start-up banner."""
        return "in memory (single process only)"

    async def add_session_event(
        self,
        conversation_id: str,
        event_type: str,
        payload: dict[str, Any],
        *,
        session_id: str | None = None,
    ) -> None:
        """Keep a session webhook body with its conversation, stamped with the time it arrived."""
        event = SessionEventRecord(
            event_type=event_type,
            session_id=session_id,
            received_at=datetime.now(UTC),
            # Through JSON, as a serialising store would, so callers see the same values from every backend.
            payload=load_payload(dump_payload(payload)),
        )
        self._session_events.setdefault(conversation_id, []).append(event)

    async def session_events(self, conversation_id: str) -> list[SessionEventRecord]:
        """The session events kept for a conversation, in the order they arrived."""
        return [
            SessionEventRecord(
                event_type=event.event_type,
                session_id=event.session_id,
                received_at=event.received_at,
                payload=load_payload(dump_payload(event.payload)),
            )
            for event in self._session_events.get(conversation_id, [])
        ]

    async def delete_record(self, conversation_id: str, *, expected_revision: str) -> None:
        """Delete the record, its session events, and the entries no remaining record or branch reaches."""
        await super().delete_record(conversation_id, expected_revision=expected_revision)
        self._session_events.pop(conversation_id, None)

    async def _delete_unrecorded_session_events(self, conversation_id: str) -> None:
        if conversation_id not in self._records:
            self._session_events.pop(conversation_id, None)
