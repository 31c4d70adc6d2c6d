"""What the voice agent needs from a conversation store, beyond pydantic-ai's own `ConversationStore`.

pydantic-ai's store keeps the messages of a conversation. A Layercode session also ends with a
`session.end` webhook (full transcript, latency metrics) and may send `session.update` (recording
status and URL). Those bodies belong to the same conversation, so each backend keeps them beside its
messages and deletes them with it: deleting a conversation removes everything about it.

Workers and servers sharing a store also coordinate through it, with **markers**: small string
values with an expiry, set atomically (`only_if_absent` is the claim of a webhook delivery), read in
batches (a worker polling for requests to cancel the turns it streams) and deleted with their
conversation. Markers that belong to no conversation (worker heartbeats) use `conversation_id=""`.

Exceptions (driver errors are translated at each backend's boundary with `raise ... from exc`)::

    StoreError                  anything a backend could not do, including a misconfigured store URL
    └── StoreUnavailableError   the backend is there but busy or unreachable right now; retrying may help

`pydantic_ai.ConversationConflict` is not a `StoreError`: it is the expected outcome of two writers
saving the same conversation, and the caller reloads and retries.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord, ConversationStore

__all__ = ["AgentStore", "SessionEventRecord", "StoreError", "StoreUnavailableError"]


class StoreError(Exception):
    """A conversation store failed, or was configured with something it cannot open."""


class StoreUnavailableError(StoreError):
    """The store is busy or unreachable (a locked database, a refused connection); a later retry may succeed."""


@dataclasses.dataclass(frozen=True)
class SessionEventRecord:
    """A Layercode session webhook body kept with its conversation, such as `session.end` or `session.update`."""

    event_type: str
    """Layercode's event type, e.g. `"session.end"`."""

    session_id: str | None
    """The Layercode session the event belongs to, when it named one."""

    received_at: datetime
    """When the store received the event, timezone-aware UTC."""

    payload: dict[str, Any]
    """The event body as Layercode sent it (JSON values only)."""


class AgentStore(ConversationStore, ABC):
    """A pydantic-ai `ConversationStore` that also keeps Layercode session events and can be closed.

    Use it as an async context manager, or call [`aclose`][layercode_agent.stores.AgentStore.aclose]
    on shutdown.
    """

    @property
    @abstractmethod
    def description(self) -> str:
        """Where conversations are kept, in words for the start-up banner, e.g. `"SQLite at data/x.db"`."""

    @abstractmethod
    async def add_session_event(
        self,
        conversation_id: str,
        event_type: str,
        payload: dict[str, Any],
        *,
        session_id: str | None = None,
    ) -> None:
        """Keep a session webhook body with its conversation, stamped with the time it arrived.

        The conversation need not have any saved messages yet.

        Args:
            conversation_id: The conversation the event belongs to.
            event_type: Layercode's event type, such as `"session.end"` or `"session.update"`.
            payload: The event body; it must be JSON-serialisable.
            session_id: The Layercode session, if the event named one.
        """

    @abstractmethod
    async def session_events(self, conversation_id: str) -> list[SessionEventRecord]:
        """The session events kept for a conversation, in the order they arrived (empty if none)."""

    @property
    def shared(self) -> bool:
        """Whether other processes can see this store (and so may be running turns of the same conversation)."""
        return True

    # --- Markers ----------------------------------------------------------------------------------

    @abstractmethod
    async def set_marker(
        self, conversation_id: str, name: str, value: str, *, ttl: float, only_if_absent: bool = False
    ) -> str | None:
        """Set a marker that expires `ttl` seconds from now, atomically.

        Args:
            conversation_id: The conversation it belongs to, or `""` for none.
            name: Its name within the conversation.
            value: The value to store.
            ttl: Seconds until it expires; must be positive.
            only_if_absent: Only set it if no unexpired marker has this key (a claim).

        Returns:
            `None` if it was set; with `only_if_absent`, the value already there if there was one.
        """

    @abstractmethod
    async def get_markers(self, keys: Sequence[tuple[str, str]]) -> list[str | None]:
        """The live markers' values at `(conversation_id, name)` keys, `None` where there is none; one round trip."""

    @abstractmethod
    async def delete_marker(self, conversation_id: str, name: str) -> None:
        """Delete a marker; nothing happens if there is none."""

    # --- Rate limits ------------------------------------------------------------------------------

    @abstractmethod
    async def take_allowance(self, key: str, *, count: int, period: float) -> float:
        """Take one request from `key`'s allowance of `count` requests per `period` seconds, atomically.

        A generic cell rate algorithm (GCRA): a client may burst up to `count` requests, then one every
        `period / count` seconds. Every process sharing the store shares each key's allowance; the
        clock is the store's own where it has one (Redis), so servers with skewed clocks agree.

        Args:
            key: Whose allowance (say `"authorize:ip:203.0.113.7"`); any string.
            count: Requests allowed per period (the burst); at least 1.
            period: Seconds; positive and finite.

        Returns:
            `0.0` if the request is allowed (and was counted); otherwise the seconds until the next
            one would be, and nothing was counted.

        Raises:
            ValueError: If `count` is below 1 or `period` is not a positive, finite number.
        """

    @staticmethod
    def _allowance_interval(count: int, period: float) -> float:
        """Check `take_allowance`'s arguments and return GCRA's interval: seconds between requests after the burst."""
        if count < 1:
            raise ValueError(f"count must be at least 1 (got {count!r})")
        # `not >` also refuses NaN; an infinite period would make the interval infinite and the expiry meaningless.
        if not (period > 0 and math.isfinite(period)):
            raise ValueError(f"period must be a positive, finite number of seconds (got {period!r})")
        return period / count

    # --- Replacing the newest messages --------------------------------------------------------------

    async def write_record_replacing(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
        released: Sequence[str] = (),
    ) -> None:
        """`write_record` for a history whose newest entries were replaced, not left as a branch.

        A turn's placeholder becomes its reply this way. `released` names the entries the new head no
        longer reaches; a backend that can deletes those nothing else reaches in the same atomic
        write. This default keeps them until the conversation is deleted.

        Raises:
            ConversationConflict: As `write_record`.
        """
        await self.write_record(record, new_entries=new_entries, expected_revision=expected_revision)

    @abstractmethod
    async def _delete_unrecorded_extras(self, conversation_id: str) -> None:
        """Delete a conversation's session events and markers if the store has no record for it.

        `delete_record` removes those of a conversation with a record; this covers a conversation
        that only ever received session events or markers, without touching a conversation that
        another writer saved in the meantime.
        """

    async def delete(self, conversation_id: str, *, scope: str | None = None) -> None:
        """Delete a conversation: its record, session events, markers, and the messages no other conversation shares.

        Messages a fork or another conversation's history still reaches are kept for it. With `scope`,
        a conversation saved with another scope is left as it is.
        """
        await super().delete(conversation_id, scope=scope)
        await self._delete_unrecorded_extras(conversation_id)

    async def aclose(self) -> None:
        """Release connections and threads; the store must not be used afterwards."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
