"""Workers sharing a store: heartbeats, requests to cancel a turn, take-over, delivery claims, local locks.

Each worker streaming a turn keeps a heartbeat marker and polls for requests to cancel its turns, so
a turn whose worker died is taken over instead of blocking the conversation; a repeated `data` or
`session.*` delivery waits for the worker that claimed it first, or takes the claim over if that
worker is gone.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from ..stores import AgentStore, StoreError
from .state import Turn

__all__ = [
    "CANCEL_TTL",
    "CLAIMED",
    "DELIVERY_TTL",
    "HEARTBEAT_EVERY",
    "HEARTBEAT_TTL",
    "RECORDED",
    "ConversationLock",
    "DeliveryInProgressError",
    "Workers",
    "claimed",
]

logger = logging.getLogger("layercode_agent.turns")

DELIVERY_TTL = 24 * 3600.0
"""How long a `data`, `session.end` or `session.update` delivery is remembered, to ignore a repeat."""
CANCEL_TTL = 60.0
"""How long a request to cancel another worker's turn stays up."""
HEARTBEAT_EVERY = 2.0
HEARTBEAT_TTL = 5.0
"""A worker streaming a turn renews its heartbeat this often; without one for this long it is gone."""
CLAIMED = "claimed:"
"""A delivery claim while its first delivery is handled: this, then the claimant's `owner`.

The claimant renews it for `HEARTBEAT_TTL` every `HEARTBEAT_EVERY / 2` seconds while it works, so it
outlives a dead worker by at most that, and a claimant without a heartbeat marker is taken over at
once. Once answered, the claim holds the answer (JSON, which never starts with this) for `DELIVERY_TTL`.
"""
RECORDED = "1"
"""A session event's claim once the event is stored."""


class DeliveryInProgressError(Exception):
    """A repeated delivery stopped waiting for the first one, which a live worker is still handling."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        """Why, safe to send back (the caller's own conversation id, nothing internal)."""
        self.retry_after = math.ceil(HEARTBEAT_TTL)
        """Seconds after which a retry finds the answer, or the claim of a worker that died gone."""


def claimed(value: str) -> bool:
    """Whether a delivery claim is still being handled (`""` is how earlier versions said so, naming nobody)."""
    return value == "" or value.startswith(CLAIMED)


class Workers:
    """This worker's side of sharing a store with others (a store that is not shared makes most of it moot)."""

    def __init__(
        self,
        store: AgentStore,
        *,
        owner: str,
        poll_interval: float,
        active: dict[str, Turn],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        """Coordinate through `store`.

        Args:
            store: The store the workers share.
            owner: This worker's name in the store.
            poll_interval: How often to check the store for what another worker does.
            active: The turns streaming here, by conversation (the runner's table, read here).
            spawn: Starts a background task the runner waits for at shutdown.
        """
        self.store = store
        self.owner = owner
        self.poll_interval = poll_interval
        self._active = active
        self._spawn = spawn
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._heartbeat_at = float("-inf")

    def lock(self, conversation_id: str) -> ConversationLock:
        """This worker's lock on a conversation, while it begins a turn there."""
        return ConversationLock(self._locks, conversation_id)

    async def heartbeat(self) -> None:
        """Tell other workers this one is alive, at most once per `HEARTBEAT_EVERY`.

        Awaited only when the last heartbeat may have expired: while it still stands for longer than
        `HEARTBEAT_EVERY`, it is renewed in the background, off the turn's path to the model.
        """
        if not self.store.shared:
            return
        now = asyncio.get_running_loop().time()
        age = now - self._heartbeat_at
        if age < HEARTBEAT_EVERY:
            return
        self._heartbeat_at = now
        if age < HEARTBEAT_TTL - HEARTBEAT_EVERY:
            self._spawn(self._renew(now))
            return
        try:
            await self._beat()
        except BaseException:
            self._heartbeat_at = float("-inf")  # Not written: the next one is awaited again.
            raise

    async def _beat(self) -> None:
        await self.store.set_marker("", f"worker:{self.owner}", "alive", ttl=HEARTBEAT_TTL)

    async def _renew(self, started: float) -> None:
        try:
            await self._beat()
        except StoreError as exc:
            if self._heartbeat_at == started:
                self._heartbeat_at = float("-inf")
            logger.warning("could not renew this worker's heartbeat: %s", exc)

    async def alive(self, owner: str | None) -> bool:
        """Whether the worker named `owner` has a heartbeat."""
        if owner is None or not self.store.shared:
            return False
        (beat,) = await self.store.get_markers([("", f"worker:{owner}")])
        return beat is not None

    async def ask_to_cancel(self, conversation_id: str, turn_id: str) -> None:
        """Ask whichever worker streams `turn_id` to stop it."""
        await self.store.set_marker(conversation_id, "cancel", turn_id, ttl=CANCEL_TTL)

    def watch(self) -> None:
        """Poll for requests to cancel this worker's turns while it has any (shared stores only)."""
        if self.store.shared and (self._watcher is None or self._watcher.done()):
            self._watcher = self._spawn(self._watch_loop())

    async def _watch_loop(self) -> None:
        failing = False
        while self._active:
            try:
                await self.heartbeat()
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

    async def claim(self, key: tuple[str, str], what: str, patience: float) -> tuple[str | None, bool]:
        """Claim a delivery, or wait for the answer of the worker that claimed it first.

        A claim whose claimant has no heartbeat, or that lapsed because nobody renewed it, is taken over
        (atomically: of several retries, one wins); a live claimant's answer is waited for, up to `patience` seconds.

        Returns:
            The first delivery's answer, or `None` once this worker holds the claim; and whether it
            found the delivery claimed by a worker that is gone (or that gave up on it).

        Raises:
            DeliveryInProgressError: If a live claimant did not answer in time.
        """
        mine = f"{CLAIMED}{self.owner}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        await self.heartbeat()  # Seen alive from the moment the claim is ours.
        if (held := await self.store.set_marker(*key, mine, ttl=HEARTBEAT_TTL, only_if_absent=True)) is None:
            return None, False
        while True:
            if held is None:  # The claim lapsed, or its claimant failed and let go: ours if no other retry was first.
                if (held := await self.store.set_marker(*key, mine, ttl=HEARTBEAT_TTL, only_if_absent=True)) is None:
                    return None, True
                continue
            if not claimed(held):
                return held, False
            claimant = held.removeprefix(CLAIMED) or None
            if claimant != self.owner and not await self.alive(claimant):
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
    async def holding(self, key: tuple[str, str]) -> AsyncGenerator[None]:
        """Keep this worker's claim on a delivery, and its heartbeat, alive while the delivery is handled."""
        mine = f"{CLAIMED}{self.owner}"

        async def renew() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_EVERY / 2)
                try:
                    await self.heartbeat()
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


class ConversationLock:
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
