"""The promises every store backend keeps, run against each real backend."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationConflict, ConversationEntry, ConversationRecord
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.usage import RequestUsage, RunUsage

from layercode_agent.protocol import DEFAULT_TOLERANCE
from layercode_agent.stores import (
    TOMBSTONE_TTL,
    AgentStore,
    DeliveryCheck,
    LogPlan,
    LogWrite,
    MemoryStore,
    RedisStore,
    SQLiteStore,
    memory,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AgentStore]:
    backend: AgentStore
    if request.param == "memory":
        backend = MemoryStore()
    elif request.param == "sqlite":
        backend = SQLiteStore(tmp_path / "conversations.db")
    else:  # Only the Redis runs start the session's redis-server.
        backend = RedisStore(request.getfixturevalue("redis_url"))
    async with backend:
        yield backend


def turn(prompt: str = "What's the weather in Paris?") -> list[ModelMessage]:
    """A real tool-using turn: prompt, tool call, tool return, answer."""
    return [
        ModelRequest(parts=[UserPromptPart(content=prompt)], instructions="Be brief."),
        ModelResponse(
            parts=[
                TextPart(content="Let me check."),
                ToolCallPart(tool_name="get_weather", args={"city": "Paris"}, tool_call_id="call-1"),
            ],
            usage=RequestUsage(input_tokens=12, output_tokens=7),
            model_name="test-model",
            timestamp=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        ),
        ModelRequest(
            parts=[
                ToolReturnPart(tool_name="get_weather", content={"sky": "sunny", "celsius": 21}, tool_call_id="call-1")
            ]
        ),
        ModelResponse(parts=[TextPart(content="It's sunny and 21 degrees.")], model_name="test-model"),
    ]


def texts(conversation: Conversation) -> list[str]:
    return [
        part.content
        for message in conversation.messages
        for part in message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]


async def test_round_trip_preserves_messages_exactly(store: AgentStore) -> None:
    messages = turn()
    usage = RunUsage(requests=2, input_tokens=20, output_tokens=9, tool_calls=1)
    await store.save(Conversation(conversation_id="c1", messages=messages, usage=usage))

    loaded = await store.load("c1")

    assert loaded is not None
    assert loaded.messages == messages
    assert loaded.usage == usage
    assert loaded.conversation_id == "c1"
    assert await store.load("missing") is None


async def test_load_with_limit_returns_the_last_messages(store: AgentStore) -> None:
    messages = turn()
    await store.save(Conversation(conversation_id="c1", messages=messages))

    loaded = await store.load("c1", limit=2)

    assert loaded is not None
    assert loaded.messages == messages[-2:]


async def test_revisions_advance_on_every_save(store: AgentStore) -> None:
    conversation = Conversation(conversation_id="c1", messages=turn()[:1])
    await store.save(conversation)
    first = conversation.revision
    assert first is not None

    loaded = await store.load("c1")
    assert loaded is not None and loaded.revision == first
    loaded.messages.extend(turn()[1:])
    await store.save(loaded)

    record = await store.read_record("c1")
    assert record is not None
    assert loaded.revision == record.revision != first


async def test_saving_a_stale_revision_conflicts_and_keeps_the_winner(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=turn("first")[:1]))
    winner, loser = await store.load("c1"), await store.load("c1")
    assert winner is not None and loser is not None
    winner.messages.append(ModelRequest.user_text_prompt("winner"))
    loser.messages.append(ModelRequest.user_text_prompt("loser"))

    await store.save(winner)
    with pytest.raises(ConversationConflict):
        await store.save(loser)

    stored = await store.load("c1")
    assert stored is not None
    assert texts(stored) == ["first", "winner"]


async def test_saving_a_new_conversation_over_an_existing_id_conflicts(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=turn()))

    with pytest.raises(ConversationConflict):
        await store.save(Conversation(conversation_id="c1", messages=turn("other")))


async def test_rewritten_history_is_stored_as_a_branch(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=turn("original")))
    loaded = await store.load("c1")
    assert loaded is not None
    rewritten = Conversation(
        conversation_id="c1", messages=turn("edited"), usage=loaded.usage, revision=loaded.revision
    )

    await store.save(rewritten)

    stored = await store.load("c1")
    record = await store.read_record("c1")
    assert stored is not None and record is not None
    assert stored.messages == rewritten.messages
    assert len(record.branches) == 1
    assert [entry.message for entry in await store.read_history(record.branches[0])] == loaded.messages


async def test_list_conversations_most_recent_first_with_limit_and_scope(store: AgentStore) -> None:
    for conversation_id in ["c1", "c2", "c3"]:
        await store.save(Conversation(conversation_id=conversation_id, messages=turn()), scope="alice")
    await store.save(Conversation(conversation_id="bob-1", messages=turn()), scope="bob")
    again = await store.load("c1")
    assert again is not None
    again.messages.append(ModelRequest.user_text_prompt("more"))
    await store.save(again)

    listed = [record.conversation_id for record in await store.list_conversations()]
    assert listed == ["c1", "bob-1", "c3", "c2"]
    assert [record.conversation_id for record in await store.list_conversations(limit=2)] == ["c1", "bob-1"]
    alice = await store.list_conversations(scope="alice")
    assert [record.conversation_id for record in alice] == ["c1", "c3", "c2"]
    assert {record.scope for record in alice} == {"alice"}


async def test_delete_removes_the_conversation_and_its_session_events(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=turn()))
    kept_messages = turn("kept")
    await store.save(Conversation(conversation_id="c2", messages=kept_messages))
    await store.add_session_event("c1", "session.end", {"transcript": []}, session_id="s1")
    record = await store.read_record("c1")
    assert record is not None and record.head_id is not None
    head_id = record.head_id

    await store.delete("c1")

    assert await store.load("c1") is None
    assert await store.session_events("c1") == []
    assert [record.conversation_id for record in await store.list_conversations()] == ["c2"]
    with pytest.raises(LookupError):
        await store.read_entry(head_id)
    kept = await store.load("c2")
    assert kept is not None and kept.messages == kept_messages


async def test_delete_removes_session_events_of_a_conversation_without_messages(store: AgentStore) -> None:
    await store.add_session_event("c1", "session.update", {"recording_status": "completed"})

    await store.delete("c1")

    assert await store.session_events("c1") == []


async def test_delete_keeps_the_messages_a_fork_shares(store: AgentStore) -> None:
    messages = turn()
    await store.save(Conversation(conversation_id="original", messages=messages))
    entries = await store.load_entries("original")
    assert entries is not None
    await store.fork("original", at=2, new_conversation_id="fork")

    await store.delete("original")

    fork = await store.load("fork")
    assert fork is not None and fork.messages == messages[:2]
    with pytest.raises(LookupError):
        await store.read_entry(entries[-1].id)  # Only the original reached it.
    await store.delete("fork")
    with pytest.raises(LookupError):
        await store.read_entry(entries[0].id)


async def test_session_events_round_trip_in_arrival_order(store: AgentStore) -> None:
    before = datetime.now(UTC)
    update = {"type": "session.update", "recording_status": "completed", "recording_url": "https://example.com/r.wav"}
    end = {"type": "session.end", "transcript": [{"role": "user", "text": "hi"}], "latency": {"p50_ms": 310.5}}
    await store.add_session_event("c1", "session.update", update, session_id="s1")
    await store.add_session_event("c1", "session.end", end, session_id="s1")
    await store.add_session_event("c2", "session.end", {}, session_id=None)

    events = await store.session_events("c1")

    assert [(event.event_type, event.session_id, event.payload) for event in events] == [
        ("session.update", "s1", update),
        ("session.end", "s1", end),
    ]
    assert before <= events[0].received_at <= events[1].received_at <= datetime.now(UTC)
    assert await store.session_events("unknown") == []


async def test_concurrent_writers_lose_no_update(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="shared"))
    conflicts = 0

    async def append(index: int) -> None:
        nonlocal conflicts
        while True:
            conversation = await store.load("shared")
            assert conversation is not None
            conversation.messages.append(ModelRequest.user_text_prompt(f"message {index}"))
            try:
                await store.save(conversation)
                return
            except ConversationConflict:
                conflicts += 1

    await asyncio.gather(*(append(index) for index in range(20)))

    stored = await store.load("shared")
    assert stored is not None
    assert sorted(texts(stored)) == sorted(f"message {index}" for index in range(20))


# --- Markers: the short-lived values workers coordinate through -------------------------------------


async def test_a_marker_is_set_read_and_deleted(store: AgentStore) -> None:
    assert await store.set_marker("c1", "cancel", "turn-1", ttl=30) is None
    await store.set_marker("", "worker:a", "alive", ttl=30)

    assert await store.get_markers([("c1", "cancel"), ("c1", "other"), ("", "worker:a"), ("c2", "cancel")]) == [
        "turn-1",
        None,
        "alive",
        None,
    ]
    assert await store.set_marker("c1", "cancel", "turn-2", ttl=30) is None  # Overwrites.
    assert await store.get_markers([("c1", "cancel")]) == ["turn-2"]
    await store.delete_marker("c1", "cancel")
    await store.delete_marker("c1", "never-set")
    assert await store.get_markers([("c1", "cancel")]) == [None]
    assert await store.get_markers([]) == []


async def test_only_if_absent_claims_a_marker_once(store: AgentStore) -> None:
    results = await asyncio.gather(
        *(store.set_marker("c1", "delivery:abc", f"worker-{index}", ttl=30, only_if_absent=True) for index in range(8))
    )

    winners = [index for index, result in enumerate(results) if result is None]
    assert len(winners) == 1
    assert set(results) - {None} == {f"worker-{winners[0]}"}
    assert await store.get_markers([("c1", "delivery:abc")]) == [f"worker-{winners[0]}"]


async def test_markers_expire(store: AgentStore) -> None:
    await store.set_marker("c1", "short", "x", ttl=0.2)
    await store.set_marker("c1", "long", "y", ttl=30)

    await asyncio.sleep(0.4)

    assert await store.get_markers([("c1", "short"), ("c1", "long")]) == [None, "y"]
    assert await store.set_marker("c1", "short", "again", ttl=30, only_if_absent=True) is None


async def test_a_marker_needs_a_positive_ttl(store: AgentStore) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await store.set_marker("c1", "x", "y", ttl=0)


async def test_delete_removes_the_markers_of_the_conversation(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=turn()))
    await store.set_marker("c1", "delivery:abc", "done", ttl=30)
    await store.set_marker("c2", "delivery:abc", "done", ttl=30)  # A conversation without messages.
    await store.set_marker("c3", "delivery:abc", "kept", ttl=30)

    await store.delete("c1")
    await store.delete("c2")

    assert await store.get_markers([("c1", "delivery:abc"), ("c2", "delivery:abc"), ("c3", "delivery:abc")]) == [
        None,
        None,
        "kept",
    ]


async def test_replace_marker_swaps_only_the_value_it_expects(store: AgentStore) -> None:
    await store.set_marker("c1", "data:abc", "claimed:dead", ttl=30)

    assert await store.replace_marker("c1", "data:abc", "claimed:other", "claimed:me", ttl=30) is False
    assert await store.get_markers([("c1", "data:abc")]) == ["claimed:dead"]
    assert await store.replace_marker("c1", "data:abc", "claimed:dead", "claimed:me", ttl=30) is True
    assert await store.get_markers([("c1", "data:abc")]) == ["claimed:me"]
    assert await store.replace_marker("c1", "never-set", "", "x", ttl=30) is False
    assert await store.get_markers([("c1", "never-set")]) == [None]
    await store.set_marker("c1", "empty", "", ttl=30)
    assert await store.replace_marker("c1", "empty", "", "claimed:me", ttl=30) is True
    with pytest.raises(ValueError, match="ttl"):
        await store.replace_marker("c1", "data:abc", "claimed:me", "x", ttl=0)


async def test_of_concurrent_replacements_of_one_value_exactly_one_wins(store: AgentStore) -> None:
    await store.set_marker("c1", "data:abc", "claimed:dead", ttl=30)

    won = await asyncio.gather(
        *(store.replace_marker("c1", "data:abc", "claimed:dead", f"claimed:{index}", ttl=30) for index in range(8))
    )

    assert won.count(True) == 1
    assert await store.get_markers([("c1", "data:abc")]) == [f"claimed:{won.index(True)}"]


async def test_a_replaced_marker_expires_with_its_new_ttl(store: AgentStore) -> None:
    await store.set_marker("c1", "claim", "mine", ttl=30)
    assert await store.replace_marker("c1", "claim", "mine", "mine", ttl=0.2)
    await asyncio.sleep(0.5)
    assert await store.get_markers([("c1", "claim")]) == [None]
    assert await store.replace_marker("c1", "claim", "mine", "mine", ttl=30) is False


# --- Tombstones of deleted conversations ---------------------------------------------------------------


def delivered(turn_id: str, delivery: str, text: str) -> list[ModelMessage]:
    """A turn as the turn runner stores it: each message names its turn, the caller's words the body's digest."""
    return [
        ModelRequest(parts=[UserPromptPart(content=text)], metadata={"turn_id": turn_id, "delivery": delivery}),
        ModelResponse(parts=[TextPart(content="Noted.")], metadata={"turn_id": turn_id, "role": "assistant"}),
    ]


async def test_a_deleted_conversation_remembers_what_its_deliveries_were_known_by(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=delivered("turn-1", "digest-1", "My secret.")))
    await store.set_marker("c1", "data:digest-2", '{"status": "ok"}', ttl=30)
    await store.add_session_event("c2", "session.end", {"type": "session.end"})  # No messages, only an event.
    await store.set_marker("c2", "event:digest-3", "1", ttl=30)

    await store.delete("c1")
    await store.delete("c2")

    assert await store.load("c1") is None and await store.session_events("c2") == []
    assert await store.deleted_with("c1", ["turn-1"])
    assert await store.deleted_with("c1", ["digest-1"])
    assert await store.deleted_with("c1", ["something else", "data:digest-2"])
    assert await store.deleted_with("c2", ["event:digest-3"])
    assert not await store.deleted_with("c1", ["turn-2", "digest-9", "data:digest-9"])
    assert not await store.deleted_with("c3", ["turn-1", "digest-1"])  # Another conversation's own names.
    # Names only: nothing that was said or answered is kept.
    (tombstone,) = await store.get_markers([("", "deleted:c1")])
    assert tombstone is not None and "secret" not in tombstone and "status" not in tombstone


async def test_deleting_a_reopened_conversation_keeps_the_earlier_tombstone(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=delivered("turn-1", "digest-1", "First.")))
    await store.delete("c1")
    await store.save(Conversation(conversation_id="c1", messages=delivered("turn-2", "digest-2", "Second.")))
    await store.delete("c1")

    assert await store.deleted_with("c1", ["turn-1"])
    assert await store.deleted_with("c1", ["digest-2"])


async def test_nothing_is_remembered_of_a_conversation_a_delete_left_alone(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=delivered("turn-1", "digest-1", "Hi.")), scope="a")

    await store.delete("c1", scope="b")
    await store.delete("never-stored")

    assert await store.load("c1") is not None
    assert not await store.deleted_with("c1", ["turn-1", "digest-1"])
    assert not await store.deleted_with("never-stored", [""])


def test_a_tombstone_outlives_every_signature_a_deleted_delivery_carried() -> None:
    # Accepted up to the tolerance ahead of our clock, a signature verifies for twice the tolerance after it came.
    assert TOMBSTONE_TTL == 2 * DEFAULT_TOLERANCE


# --- Replacing the newest messages (a turn's placeholder becoming its reply) --------------------------


async def replace_last(store: AgentStore, conversation_id: str, messages: list[ModelMessage]) -> list[str]:
    """Replace the newest entry of a conversation with `messages`; returns the released entry ids."""
    record = await store.read_record(conversation_id)
    assert record is not None and record.head_id is not None
    head = await store.read_entry(record.head_id)
    parent_id = head.parent_id
    entries: list[ConversationEntry] = []
    for message in messages:
        entries.append(ConversationEntry(parent_id=parent_id, message=message))
        parent_id = entries[-1].id
    replaced = dataclasses.replace(record, head_id=parent_id, revision=f"{record.revision}+")
    await store.write_record_replacing(
        replaced, new_entries=entries, expected_revision=record.revision, released=[head.id]
    )
    return [head.id]


async def test_replacing_the_newest_message_leaves_no_branch(store: AgentStore) -> None:
    messages = turn()
    placeholder = ModelResponse(parts=[], metadata={"status": "pending"})
    await store.save(Conversation(conversation_id="c1", messages=[*messages[:1], placeholder]))

    await replace_last(store, "c1", messages[1:])

    loaded = await store.load("c1")
    assert loaded is not None and loaded.messages == messages
    record = await store.read_record("c1")
    assert record is not None and record.branches == []


async def test_a_replaced_message_is_gone_once_the_conversation_is_deleted(store: AgentStore) -> None:
    messages = turn()
    await store.save(Conversation(conversation_id="c1", messages=[*messages[:1], ModelResponse(parts=[])]))
    (released,) = await replace_last(store, "c1", messages[1:])

    await store.delete("c1")

    with pytest.raises(LookupError):
        await store.read_entry(released)


async def test_replacing_with_a_stale_revision_conflicts_and_changes_nothing(store: AgentStore) -> None:
    messages = turn()
    await store.save(Conversation(conversation_id="c1", messages=[*messages[:1], ModelResponse(parts=[])]))
    record = await store.read_record("c1")
    assert record is not None
    conversation = await store.load("c1")
    assert conversation is not None
    conversation.messages.append(ModelRequest.user_text_prompt("in between"))
    await store.save(conversation)

    with pytest.raises(ConversationConflict):
        await store.write_record_replacing(
            dataclasses.replace(record, revision="new"), expected_revision=record.revision, released=[]
        )

    loaded = await store.load("c1")
    assert loaded is not None and texts(loaded)[-1] == "in between"


# --- A turn's log: read whole, changed atomically -------------------------------------------------------


def prompts(history: list[ConversationEntry]) -> list[str]:
    return [
        part.content
        for entry in history
        for part in entry.message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]


def appending(message: ModelMessage, *, answer: str = "written") -> LogPlan[str]:
    """A plan that adds `message` after the newest one and answers `answer`."""

    def plan(record: ConversationRecord | None, history: list[ConversationEntry]) -> tuple[str, LogWrite | None]:
        parent_id = history[-1].id if history else None
        entry = ConversationEntry(parent_id=parent_id, message=message)
        updated = ConversationRecord(
            conversation_id="log",
            head_id=entry.id,
            usage=record.usage if record is not None else RunUsage(),
            updated_at=datetime.now(UTC),
        )
        return answer, LogWrite(updated, [entry])

    return plan


async def test_read_log_gives_the_record_and_the_whole_history(store: AgentStore) -> None:
    messages = turn()
    await store.save(Conversation(conversation_id="c1", messages=messages))

    record, history = await store.read_log("c1")
    again, history_again = await store.read_log("c1")

    assert record is not None and record == await store.read_record("c1") and again == record
    assert [entry.message for entry in history] == messages == [entry.message for entry in history_again]
    assert [entry.id for entry in history] == [entry.id for entry in await store.read_history(record.head_id)]
    assert await store.read_log("missing") == (None, [])


async def test_read_log_never_serves_an_entry_the_store_no_longer_has(store: AgentStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=turn()))
    _, history = await store.read_log("c1")  # Parsed and kept, where the backend keeps entries.
    await store.delete("c1")

    assert await store.read_log("c1") == (None, [])
    with pytest.raises(LookupError):
        await store.read_entry(history[-1].id)


async def test_sqlite_and_redis_parse_an_entry_once(store: AgentStore) -> None:
    if isinstance(store, MemoryStore):
        pytest.skip("the in-process store hands out copies, as pydantic-ai's does")
    await store.save(Conversation(conversation_id="c1", messages=turn()))
    _, history = await store.read_log("c1")
    await store.rewrite("c1", lambda record, log: (None, None))
    _, again = await store.read_log("c1")

    assert all(entry is kept for entry, kept in zip(again, history, strict=True))
    fresh = await store.read_history(history[-1].id)  # pydantic-ai's own read: parsed, the caller's to change.
    assert fresh[-1] is not history[-1] and fresh[-1] == history[-1]


async def test_rewrite_writes_what_the_plan_says_and_answers_what_it_answers(store: AgentStore) -> None:
    first = await store.rewrite("log", appending(ModelRequest.user_text_prompt("one"), answer="first"))
    second = await store.rewrite("log", appending(ModelRequest.user_text_prompt("two"), answer="second"))

    assert (first, second) == ("first", "second")
    record, history = await store.read_log("log")
    assert record is not None and record.head_id == history[-1].id
    assert prompts(history) == ["one", "two"]


async def test_a_plan_that_writes_nothing_changes_nothing(store: AgentStore) -> None:
    await store.rewrite("log", appending(ModelRequest.user_text_prompt("one")))
    before = await store.read_record("log")
    seen: list[int] = []

    def look(record: ConversationRecord | None, history: list[ConversationEntry]) -> tuple[int, LogWrite | None]:
        seen.append(len(history))
        return len(history), None

    assert await store.rewrite("log", look) == 1
    assert seen == [1]
    assert await store.read_record("log") == before


async def test_concurrent_rewrites_lose_no_message(store: AgentStore) -> None:
    await asyncio.gather(
        *(store.rewrite("log", appending(ModelRequest.user_text_prompt(f"message {index}"))) for index in range(20))
    )

    _, history = await store.read_log("log")
    contents = prompts(history)
    assert sorted(contents) == sorted(f"message {index}" for index in range(20))
    assert [entry.parent_id for entry in history[1:]] == [entry.id for entry in history[:-1]]  # One chain.


async def test_a_plan_that_raises_writes_nothing(store: AgentStore) -> None:
    await store.rewrite("log", appending(ModelRequest.user_text_prompt("one")))
    before = await store.read_record("log")

    def fail(record: ConversationRecord | None, history: list[ConversationEntry]) -> tuple[None, LogWrite | None]:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await store.rewrite("log", fail)
    assert await store.read_record("log") == before


# --- Rate limits: a GCRA allowance per key ------------------------------------------------------------

COUNT, PERIOD = 3, 0.6
"""A burst of 3, then one request every 0.2 s: long enough for a noisy machine to keep up with."""

INTERVAL = PERIOD / COUNT


async def take(store: AgentStore, key: str = "authorize:ip:203.0.113.7") -> float:
    return await store.take_allowance(key, count=COUNT, period=PERIOD)


async def test_a_burst_of_count_requests_is_allowed_then_one_per_interval(store: AgentStore) -> None:
    assert [await take(store) for _ in range(COUNT)] == [0.0] * COUNT

    retry_after = await take(store)

    # At most one interval (plus Redis rounding up to the microsecond), less whatever the burst took.
    assert INTERVAL / 2 < retry_after <= INTERVAL + 1e-3


async def test_after_waiting_the_retry_after_one_more_request_is_allowed(store: AgentStore) -> None:
    for _ in range(COUNT):
        await take(store)
    retry_after = await take(store)
    assert retry_after > 0

    await asyncio.sleep(retry_after)

    assert await take(store) == 0.0
    assert await take(store) > 0  # Only one came back.


async def test_keys_have_separate_allowances(store: AgentStore) -> None:
    for _ in range(COUNT):
        await take(store, "alice")
    assert await take(store, "alice") > 0

    assert [await take(store, "bob") for _ in range(COUNT)] == [0.0] * COUNT
    assert await take(store, "bob") > 0


async def test_a_refused_request_takes_nothing(store: AgentStore) -> None:
    for _ in range(COUNT):
        await take(store)
    refusals = [await take(store) for _ in range(5)]
    assert all(retry_after > 0 for retry_after in refusals)
    # Counting them would have pushed each wait another interval further out.
    assert all(later <= earlier + 1e-3 for earlier, later in itertools.pairwise(refusals))

    await asyncio.sleep(refusals[-1])

    assert await take(store) == 0.0


async def test_concurrent_requests_get_exactly_the_burst(store: AgentStore) -> None:
    results = await asyncio.gather(*(store.take_allowance("shared", count=5, period=60) for _ in range(20)))

    assert results.count(0.0) == 5
    assert all(retry_after > 0 for retry_after in results if retry_after != 0.0)


@pytest.mark.parametrize(
    ("count", "period", "message"),
    [
        (0, 1.0, r"count must be at least 1 \(got 0\)"),
        (-1, 1.0, "count must be at least 1"),
        (1, 0.0, r"period must be a positive, finite number of seconds \(got 0.0\)"),
        (1, -1.0, "period must be a positive"),
        (1, float("nan"), "period must be a positive"),
        (1, float("inf"), "period must be a positive, finite"),
    ],
)
async def test_an_allowance_needs_a_count_of_at_least_one_and_a_positive_period(
    store: AgentStore, count: int, period: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await store.take_allowance("k", count=count, period=period)


async def test_the_in_process_store_sweeps_out_allowances_that_are_full_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The other backends leave this to Redis expiry, or to the sweep of expired markers SQLite does on every write.
    clock = 1000.0
    monkeypatch.setattr(memory, "time", SimpleNamespace(monotonic=lambda: clock))
    store = MemoryStore()
    for index in range(2000):  # The first sweep, at 1024, finds none full again: the next waits for 2048.
        await store.take_allowance(f"client-{index}", count=1, period=1)
    assert len(store._allowances) == 2000

    clock += 2
    for index in range(100):  # The 48th brings it to 2048: every `client-` allowance is full again by now.
        await store.take_allowance(f"later-{index}", count=1, period=60)

    assert len(store._allowances) == 100
    assert await store.take_allowance("later-0", count=1, period=60) > 0  # Live allowances are kept.


async def test_a_delivery_check_gives_the_records_revision_as_it_is_now(store: AgentStore) -> None:
    assert await store.delivery_check("c1", ["turn-1"]) == DeliveryCheck(deleted=False, revision=None)
    await store.save(Conversation(conversation_id="c1", messages=delivered("turn-1", "digest-1", "Hi.")))
    first = await store.read_record("c1")
    assert first is not None
    assert await store.delivery_check("c1", ["turn-1"]) == DeliveryCheck(deleted=False, revision=first.revision)

    loaded = await store.load("c1")
    assert loaded is not None
    loaded.messages.extend(delivered("turn-2", "digest-2", "Again."))
    await store.save(loaded)
    second = await store.read_record("c1")
    assert second is not None and second.revision != first.revision
    assert (await store.delivery_check("c1", [])).revision == second.revision

    await store.delete("c1")
    assert await store.delivery_check("c1", ["digest-2"]) == DeliveryCheck(deleted=True, revision=None)
    assert await store.delivery_check("c1", ["turn-3"]) == DeliveryCheck(deleted=False, revision=None)
