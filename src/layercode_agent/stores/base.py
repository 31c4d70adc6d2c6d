"""What the voice agent needs from a conversation store, beyond pydantic-ai's own `ConversationStore`.

pydantic-ai's store keeps the messages of a conversation. A Layercode session also ends with a
`session.end` webhook (full transcript, latency metrics) and may send `session.update` (recording
status and URL). Those bodies belong to the same conversation, so each backend keeps them beside its
messages and deletes them with it: deleting a conversation removes everything about it.

Workers and servers sharing a store also coordinate through it, with **markers**: small string
values with an expiry, set atomically (`only_if_absent` is the claim of a webhook delivery), read in
batches (a worker polling for requests to cancel the turns it streams), replaced only if unchanged
(a worker taking over the claim of one that died) and deleted with their conversation. Markers that
belong to no conversation (worker heartbeats) use `conversation_id=""`.

Deleting a conversation leaves a **tombstone** for `TOMBSTONE_TTL` seconds: the names its deliveries
were known by (each message's `turn_id` and `delivery` metadata, and its markers' names, such as the
claims `data:<digest>`), and nothing of what was said. A replay of one of those webhooks, whose
signature still verifies for that long, is recognised by `deleted_with` and must not reopen it.

Exceptions (driver errors are translated at each backend's boundary with `raise ... from exc`)::

    StoreError                  anything a backend could not do, including a misconfigured store URL
    └── StoreUnavailableError   the backend is there but busy or unreachable right now; retrying may help

`pydantic_ai.ConversationConflict` is not a `StoreError`: it is the expected outcome of two writers
saving the same conversation, and the caller reloads and retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
)

__all__ = [
    "TOMBSTONE_TTL",
    "AgentStore",
    "DeliveryCheck",
    "LogPlan",
    "LogWrite",
    "SessionEventRecord",
    "StoreError",
    "StoreUnavailableError",
]

_T = TypeVar("_T")

TOMBSTONE_TTL: Final = 600.0
"""Seconds a deleted conversation's delivery names are kept: twice the webhook signature tolerance.

A signature is accepted while its timestamp is within 300 s of our clock either way
(`protocol.DEFAULT_TOLERANCE`; this layer does not import `protocol`, a test holds the two together), so
a webhook accepted just before the deletion, dated up to 300 s ahead, still verifies 600 s later.
"""

_TOMBSTONE_KEYS = ("turn_id", "delivery")
"""The message metadata naming the webhook that delivered a message (the turn record of `history`)."""


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


@dataclasses.dataclass(frozen=True)
class LogWrite:
    """What a `rewrite` plan stores.

    The conversation's new record, the entries it adds after the ones it keeps, and the entries its
    new head no longer reaches (deleted where nothing else reaches them).
    """

    record: ConversationRecord
    new_entries: Sequence[ConversationEntry] = ()
    released: Sequence[str] = ()


LogPlan = Callable[[ConversationRecord | None, list[ConversationEntry]], tuple[_T, LogWrite | None]]
"""Given a conversation's record and history (oldest first), what to answer and what to write (`None`: nothing).

It must be pure and quick: a backend may run it more than once (after a conflict), on one of its own threads,
inside its write transaction."""


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
    async def replace_marker(self, conversation_id: str, name: str, expected: str, value: str, *, ttl: float) -> bool:
        """Set a marker to `value`, expiring `ttl` seconds from now, only if its live value is `expected`, atomically.

        Returns:
            Whether it was replaced: `False` if the marker is gone or holds another value.
        """

    @abstractmethod
    async def delete_marker(self, conversation_id: str, name: str) -> None:
        """Delete a marker; nothing happens if there is none."""

    @abstractmethod
    async def _marker_names(self, conversation_id: str) -> list[str]:
        """The names of a conversation's markers (those just expired may be among them)."""

    # --- Tombstones of deleted conversations -----------------------------------------------------

    async def deleted_with(self, conversation_id: str, names: Iterable[str]) -> bool:
        """Whether a deletion of this conversation in the last `TOMBSTONE_TTL` seconds removed any of `names`.

        `names` are what a webhook is known by: a message's `turn_id` or `delivery` (the body's digest),
        or the name of a marker such as `data:<digest>`.
        """
        return (await self.delivery_check(conversation_id, names)).deleted

    async def delivery_check(self, conversation_id: str, names: Iterable[str]) -> DeliveryCheck:
        """`deleted_with`, and the revision of the conversation's record as it is now, in one round trip."""
        tombstone, revision = await self._tombstone_and_revision(conversation_id, _tombstone_key(conversation_id))
        deleted = tombstone is not None and not set(json.loads(tombstone)).isdisjoint(names)
        return DeliveryCheck(deleted=deleted, revision=revision)

    async def _tombstone_and_revision(
        self, conversation_id: str, key: tuple[str, str]
    ) -> tuple[str | None, str | None]:
        """The live marker at `key` and the record's revision (`None`: no record); a backend may do both at once."""
        (tombstone,) = await self.get_markers([key])
        record = await self.read_record(conversation_id)
        return tombstone, record.revision if record is not None else None

    async def _leave_tombstone(self, conversation_id: str, *, scope: str | None) -> None:
        """Remember the names of the conversation's deliveries, before it is deleted (see `TOMBSTONE_TTL`).

        Written first, so no replay slips in between the deletion and the tombstone; under no conversation,
        so deleting does not delete it; merged with an earlier tombstone of the same id.
        """
        record = await self.read_record(conversation_id)
        if record is not None and scope is not None and record.scope != scope:
            return  # `delete` leaves it as it is.
        names = set(await self._marker_names(conversation_id))
        conversation = await self.load(conversation_id) if record is not None else None
        for message in conversation.messages if conversation is not None else []:
            meta = message.metadata or {}
            names.update(str(meta[key]) for key in _TOMBSTONE_KEYS if meta.get(key) is not None)
        key = _tombstone_key(conversation_id)
        (earlier,) = await self.get_markers([key])
        if earlier is not None:
            names.update(json.loads(earlier))
        if names:
            await self.set_marker(*key, json.dumps(sorted(names)), ttl=TOMBSTONE_TTL)

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

    # --- A turn's log: read whole, changed atomically ---------------------------------------------------

    async def read_log(self, conversation_id: str) -> tuple[ConversationRecord | None, list[ConversationEntry]]:
        """A conversation's record and its whole history, oldest first (empty when the conversation is new).

        For the turn's own reads: a backend may hand out the same entry objects again (it keeps what it
        has parsed once, since an entry never changes after it is written), so neither the entries nor
        their messages may be changed in place; replace them with edited copies instead.

        Raises:
            LookupError: If a concurrent delete or rewrite released the history mid-read.
        """
        record = await self.read_record(conversation_id)
        if record is None or record.head_id is None:
            return record, []
        return record, await self.read_history(record.head_id)

    async def rewrite(self, conversation_id: str, plan: LogPlan[_T], *, attempts: int = 12) -> _T:
        """Read the log, let `plan` decide, and write what it says atomically; return what it answered.

        This default reads (`read_log`), then writes with the revision check, reading and planning again
        when another writer won (at most `attempts` times, spread so a crowd of writers does not collide
        again). A backend with transactions may do all of it in one.

        Raises:
            StoreError: If the store fails, or other writers kept winning for every attempt.
        """
        for attempt in range(attempts):
            try:
                record, history = await self.read_log(conversation_id)
            except LookupError:
                continue  # A concurrent delete or rewrite released the history mid-read.
            result, write = plan(record, history)
            if write is None:
                return result
            try:
                await self.write_record_replacing(
                    write.record,
                    new_entries=write.new_entries,
                    expected_revision=record.revision if record is not None else None,
                    released=write.released,
                )
            except ConversationConflict:
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                continue
            return result
        raise kept_changing(conversation_id, attempts)

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
        a conversation saved with another scope is left as it is. What its deliveries were known by is
        kept for `TOMBSTONE_TTL` seconds (see `deleted_with`), so a replay cannot reopen it.
        """
        await self._leave_tombstone(conversation_id, scope=scope)
        await super().delete(conversation_id, scope=scope)
        await self._delete_unrecorded_extras(conversation_id)

    async def ping(self) -> None:
        """Check the store can take a write now, for a readiness check: one small marker, `("", "ready")`.

        A write rather than a read, so a read-only Redis replica, a Redis out of memory or a frozen
        disk fail it too. Callers bound the wait with a deadline of their own.

        Raises:
            StoreError: If the store cannot be written.
        """
        await self.set_marker("", "ready", "", ttl=60)

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


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryCheck:
    """What the store says of a webhook before anything is done with it (`AgentStore.delivery_check`)."""

    deleted: bool
    """It repeats a delivery of a conversation deleted since: it must be answered without acting."""
    revision: str | None
    """The conversation record's revision now, `None` if there is none: whether a log known from before still is."""


def kept_changing(conversation_id: str, attempts: int) -> StoreError:
    """The error of a `rewrite` that lost to other writers every time."""
    return StoreError(f"conversation {conversation_id!r} kept changing while saving; gave up after {attempts} attempts")


def _tombstone_key(conversation_id: str) -> tuple[str, str]:
    return "", f"deleted:{conversation_id}"
