"""The reply-stream slots of a conversation: new turns and repeats are limited apart, and each turn on its own."""

from __future__ import annotations

import pytest

from layercode_agent.server.streams import StreamSlot, StreamSlots


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admitted(slots: StreamSlots, *turns: str, conversation: str = "c", limit: int = 2) -> list[bool | str]:
    """Open a stream per turn named, in order: True for a new turn's slot, False for a repeat's, or why refused."""
    out: list[bool | str] = []
    for turn in turns:
        slot = slots.admit(conversation, turn, limit)
        out.append(slot if isinstance(slot, str) else not slot.repeat)
    return out


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        # New turns: two at once, the third refused.
        (["t1", "t2", "t3"], [True, True, "new turns"]),
        # One turn: its first delivery and one repeat, the next repeat refused.
        (["t1", "t1", "t1"], [True, False, "this turn"]),
        # Repeats of the turn streaming never take a new turn's slot: the next real turn gets one.
        (["t1", "t1", "t2"], [True, False, True]),
        # Repeats across turns: two at once, then refused, while new turns still get theirs.
        (["t1", "t2", "t1", "t2", "t1", "t3"], [True, True, False, False, "this turn", "new turns"]),
    ],
)
def test_streams_open_at_once(turns: list[str], expected: list[bool | str]) -> None:
    got = admitted(StreamSlots(), *turns)
    for value, want in zip(got, expected, strict=True):
        if isinstance(want, str):
            assert isinstance(value, str) and want in value and "conversation c" in value
        else:
            assert value is want


def test_a_replay_of_a_turn_that_ended_is_a_repeat_for_as_long_as_a_replay_can_arrive() -> None:
    clock = Clock()
    slots = StreamSlots(memory=600, clock=clock)
    for turn in ("t1", "t2"):  # Two turns answered one after the other.
        slot = slots.admit("c", turn, 2)
        assert isinstance(slot, StreamSlot) and not slot.repeat
        slots.release(slot)
    live = slots.admit("c", "t3", 2)
    assert isinstance(live, StreamSlot) and not live.repeat

    # Replays of the earlier turns, held open, take repeat slots only: the caller's next turn still gets one.
    replays = [slots.admit("c", turn, 2) for turn in ("t1", "t2")]
    assert all(isinstance(slot, StreamSlot) and slot.repeat for slot in replays)
    assert isinstance(slots.admit("c", "t4", 2), StreamSlot)
    assert "new turns" in str(slots.admit("c", "t5", 2))
    assert slots.open("c") == 4

    for slot in replays:
        assert isinstance(slot, StreamSlot)
        slots.release(slot)
    clock.now += 601  # Long after any signature of t1 expired.
    again = slots.admit("c", "t1", 2)
    assert isinstance(again, str) and "new turns" in again, "t3 and t4 still stream: t1 is a new turn again"


def test_slots_are_given_back_and_conversations_are_apart() -> None:
    slots = StreamSlots()
    first = slots.admit("a", "t1", 1)
    assert isinstance(first, StreamSlot)
    assert isinstance(slots.admit("a", "t2", 1), str)
    assert isinstance(slots.admit("b", "t1", 1), StreamSlot), "another conversation is not limited"
    slots.release(first)
    assert slots.open("a") == 0
    assert isinstance(slots.admit("a", "t2", 1), StreamSlot)
