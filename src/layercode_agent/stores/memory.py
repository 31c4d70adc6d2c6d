"""The in-process store: pydantic-ai's `InMemoryConversationStore` plus session events.

For tests, the playground and single-process development. Nothing survives a restart and nothing is
shared between workers, which is why the start-up banner says so.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord, InMemoryConversationStore

from ._serialization import dump_payload, load_payload
from .base import AgentStore, SessionEventRecord

__all__ = ["MemoryStore"]

_PRUNE_FLOOR = 1024
"""How many rate-limit keys the store holds before it first sweeps out those full again; later sweeps wait for twice
what the last one left."""


class MemoryStore(InMemoryConversationStore, AgentStore):
    """Keeps conversations and their session events in this process's memory.

    Deleting a conversation deletes its session events and the messages no other conversation's
    history (a fork, a branch) still reaches.
    """

    def __init__(self) -> None:
        super().__init__()
        self._session_events: dict[str, list[SessionEventRecord]] = {}
        # (conversation_id, name) -> (value, monotonic expiry)
        self._markers: dict[tuple[str, str], tuple[str, float]] = {}
        # Rate-limit key -> GCRA theoretical arrival time (TAT), monotonic. A TAT in the past means the
        # same as no entry, so a sweep drops those; sweeping whenever the dict has doubled since the last
        # one keeps the cost amortised constant and the size under twice the live keys (or the floor).
        self._allowances: dict[str, float] = {}
        self._prune_at = _PRUNE_FLOOR

    @property
    def description(self) -> str:
        """Human text for the start-up banner."""
        return "in memory (single process only)"

    @property
    def shared(self) -> bool:
        """Never: only this process sees it."""
        return False

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

    async def set_marker(
        self, conversation_id: str, name: str, value: str, *, ttl: float, only_if_absent: bool = False
    ) -> str | None:
        """Set a marker that expires `ttl` seconds from now; with `only_if_absent`, return the live value instead."""
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        key = (conversation_id, name)
        if only_if_absent and (current := self._live(key)) is not None:
            return current
        self._markers[key] = (value, time.monotonic() + ttl)
        return None

    async def get_markers(self, keys: Sequence[tuple[str, str]]) -> list[str | None]:
        """The live values at `keys`, `None` where there is none."""
        return [self._live(key) for key in keys]

    async def replace_marker(self, conversation_id: str, name: str, expected: str, value: str, *, ttl: float) -> bool:
        """Set the marker to `value` if its live value is `expected`."""
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        key = (conversation_id, name)
        if self._live(key) != expected:
            return False
        self._markers[key] = (value, time.monotonic() + ttl)
        return True

    async def delete_marker(self, conversation_id: str, name: str) -> None:
        """Delete a marker if there is one."""
        self._markers.pop((conversation_id, name), None)

    async def _marker_names(self, conversation_id: str) -> list[str]:
        return [name for owner, name in self._markers if owner == conversation_id]

    async def take_allowance(self, key: str, *, count: int, period: float) -> float:
        """Take one request from `key`'s allowance, GCRA on this process's monotonic clock."""
        interval = self._allowance_interval(count, period)
        now = time.monotonic()
        tat = max(self._allowances.get(key, now), now)
        allow_at = tat + interval - period
        if now < allow_at:
            return allow_at - now
        self._allowances[key] = tat + interval
        if len(self._allowances) >= self._prune_at:
            self._allowances = {name: held for name, held in self._allowances.items() if held > now}
            self._prune_at = max(_PRUNE_FLOOR, 2 * len(self._allowances))
        return 0.0

    def _live(self, key: tuple[str, str]) -> str | None:
        marker = self._markers.get(key)
        if marker is None:
            return None
        if marker[1] <= time.monotonic():
            del self._markers[key]
            return None
        return marker[0]

    async def write_record_replacing(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
        released: Sequence[str] = (),
    ) -> None:
        """Write the record, then drop the released entries that nothing reaches any more."""
        await self.write_record(record, new_entries=new_entries, expected_revision=expected_revision)
        if not released:
            return
        gone = set(released)
        referenced = {entry.parent_id for entry in self._entries.values() if entry.id not in gone}
        for stored in self._records.values():
            referenced.update([stored.head_id, *stored.branches])
        for entry_id in gone - referenced:
            self._entries.pop(entry_id, None)

    async def delete_record(self, conversation_id: str, *, expected_revision: str) -> None:
        """Delete the record, its session events and markers, and the entries no remaining record or branch reaches."""
        await super().delete_record(conversation_id, expected_revision=expected_revision)
        self._drop_extras(conversation_id)

    async def _delete_unrecorded_extras(self, conversation_id: str) -> None:
        if conversation_id not in self._records:
            self._drop_extras(conversation_id)

    def _drop_extras(self, conversation_id: str) -> None:
        self._session_events.pop(conversation_id, None)
        for key in [key for key in self._markers if key[0] == conversation_id]:
            del self._markers[key]
