"""The reply streams one conversation may hold on a worker (`MAX_STREAMS_PER_CONVERSATION`), by turn.

A conversation's streams are grouped by the turn they answer: the webhook's `turn_id`, or the body's
digest when it has none, as the turn runner names turns. With the limit `L`:

- streams of **new turns** (ones this worker has not seen lately): at most `L` at once;
- streams of **repeats** (a Layercode retry, or a replay within the signature tolerance, of a turn
  seen lately): at most `L` at once;
- streams of **one turn** (its first delivery and the repeats waiting for its reply): at most `L`.

So a conversation holds at most `2 L` streams, a flood of distinct turns is refused past `L`, and a
flood of repeats, which never counts against new turns, cannot lock the caller's next message out.
A turn is seen lately for `memory` seconds after its last stream opened: longer than a signed body
stays valid, so a replay of a turn this worker answered is a repeat for as long as it can arrive.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..protocol import DEFAULT_TOLERANCE

__all__ = ["StreamSlot", "StreamSlots"]

_SEEN_LIMIT = 100_000
"""Turns remembered at most (the oldest are forgotten first); a forgotten one counts as new again."""

_K = TypeVar("_K")


@dataclass(frozen=True)
class StreamSlot:
    """One open stream's place: give it back with `StreamSlots.release` when the stream ends."""

    conversation_id: str
    turn: str
    repeat: bool
    """Whether it repeats a turn seen lately (so it holds a repeat's slot, not a new turn's)."""


class StreamSlots:
    """The slots of one worker's reply streams; not thread-safe (one event loop uses it)."""

    def __init__(self, *, memory: float = 2 * DEFAULT_TOLERANCE, clock: Callable[[], float] = time.monotonic) -> None:
        """Count nothing yet.

        Args:
            memory: Seconds a turn stays seen after its last stream opened (by default twice the signature
                tolerance, since a body may be signed up to that far ahead of the clock).
            clock: Seconds, monotonic (tests pass their own).
        """
        self.memory = memory
        self._clock = clock
        self._per_turn: dict[tuple[str, str], int] = {}
        self._new: dict[str, int] = {}
        self._repeats: dict[str, int] = {}
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        """(conversation, turn) -> when it stops being seen, oldest first."""

    def admit(self, conversation_id: str, turn: str, limit: int) -> StreamSlot | str:
        """A slot for a stream of `turn`, or why there is none (a reason naming only the conversation)."""
        now = self._clock()
        self._forget(now)
        key = (conversation_id, turn)
        repeat = key in self._seen or key in self._per_turn
        if self._per_turn.get(key, 0) >= limit:
            return f"this turn of conversation {conversation_id} already has {limit} reply streams open"
        pool, kind = (self._repeats, "repeated deliveries") if repeat else (self._new, "new turns")
        if pool.get(conversation_id, 0) >= limit:
            return f"conversation {conversation_id} already has {limit} reply streams of {kind} open"
        self._per_turn[key] = self._per_turn.get(key, 0) + 1
        pool[conversation_id] = pool.get(conversation_id, 0) + 1
        self._seen.pop(key, None)
        self._seen[key] = now + self.memory
        return StreamSlot(conversation_id, turn, repeat)

    def release(self, slot: StreamSlot) -> None:
        """Give a slot back (once, when its stream has ended however it ended)."""
        _decrement(self._per_turn, (slot.conversation_id, slot.turn))
        _decrement(self._repeats if slot.repeat else self._new, slot.conversation_id)

    def open(self, conversation_id: str) -> int:
        """The streams the conversation holds now."""
        return self._new.get(conversation_id, 0) + self._repeats.get(conversation_id, 0)

    def total(self) -> int:
        """The streams all conversations hold now."""
        return sum(self._new.values()) + sum(self._repeats.values())

    def _forget(self, now: float) -> None:
        while self._seen and (next(iter(self._seen.values())) <= now or len(self._seen) > _SEEN_LIMIT):
            self._seen.popitem(last=False)


def _decrement(counts: dict[_K, int], key: _K) -> None:
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
