"""What the Redis backend promises beyond the contract: retention, atomic writes, several servers, outages."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable
from typing import cast

import pytest
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationConflict, ConversationEntry
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart
from redis.asyncio import Redis

from layercode_agent.stores import TOMBSTONE_TTL, RedisStore, StoreError, StoreUnavailableError, open_store

from ..fakes.net import free_port
from ..fakes.redis_server import RedisServer
from .sharing import assert_one_allowance

pytestmark = pytest.mark.anyio


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client on the same server, to look at keys the way an operator would."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    async with RedisStore(redis_url) as opened:
        yield opened


def exchange(prompt: str) -> list[ModelRequest | ModelResponse]:
    return [ModelRequest.user_text_prompt(prompt), ModelResponse(parts=[TextPart(content=f"answer to {prompt}")])]


def prompts(conversation: Conversation) -> list[str]:
    return [
        str(part.content)
        for message in conversation.messages
        for part in message.parts
        if isinstance(part, UserPromptPart)
    ]


async def keys(raw: Redis, prefix: str) -> set[str]:
    return set(await cast("Awaitable[list[str]]", raw.keys(f"{prefix}*")))


async def pttl(raw: Redis, key: str) -> int:
    return await cast("Awaitable[int]", raw.pttl(key))


async def with_messages(store: RedisStore, conversation_id: str, *texts: str) -> Conversation:
    conversation = await store.load(conversation_id) or Conversation(conversation_id=conversation_id)
    for text in texts:
        conversation.messages.extend(exchange(text))
    await store.save(conversation)
    return conversation


# --- Retention ----------------------------------------------------------------------------------------


async def test_every_key_of_a_conversation_gets_the_retention_and_each_write_refreshes_it(
    redis_url: str, raw: Redis
) -> None:
    async with RedisStore(f"{redis_url}&ttl=60") as store:
        await with_messages(store, "c1", "one")
        await store.fork("c1", at=1, new_conversation_id="fork")  # Shares c1's first entry.
        await store.add_session_event("c1", "session.update", {"recording_status": "completed"})
        await store.set_marker("c1", "delivery:abc", "done", ttl=600)
        written = await keys(raw, store.prefix)
        assert {key.removeprefix(store.prefix).split(":")[0] for key in written} == {
            "conversation",
            "entry",
            "index",
            "marker",
        }
        for key in written:
            if "marker" in key:  # Markers keep the expiry they were set with (the index outlives them by 1 ms).
                assert 590_000 < await pttl(raw, key) <= 600_001, key
            else:
                assert 59_000 < await pttl(raw, key) <= 60_000, key

        for key in written:  # As if most of the retention had passed.
            if "marker" not in key:
                await raw.pexpire(key, 1000)
        await with_messages(store, "c1", "two")

        refreshed = {key for key in await keys(raw, store.prefix) if "marker" not in key and ":fork:" not in key}
        assert len(refreshed) > len([key for key in written if "marker" not in key and ":fork:" not in key])
        for key in refreshed:
            assert await pttl(raw, key) > 59_000, key
        for key in await keys(raw, f"{store.prefix}conversation:fork:"):
            assert await pttl(raw, key) <= 1000, key  # The fork was not written: it keeps its own clock.


async def test_a_write_to_a_fork_keeps_the_entries_it_shares_alive(redis_url: str, raw: Redis) -> None:
    async with RedisStore(f"{redis_url}&ttl=60") as store:
        await with_messages(store, "original", "one", "two")
        await store.fork("original", at=2, new_conversation_id="fork")
        shared = await store.load_entries("fork")
        assert shared is not None and len(shared) == 2
        for key in await keys(raw, store.prefix):
            await raw.pexpire(key, 1000)

        await with_messages(store, "fork", "three")

        for entry in shared:
            assert await pttl(raw, f"{store.prefix}entry:{entry.id}") > 59_000
        assert await pttl(raw, f"{store.prefix}conversation:original:record") <= 1000


async def test_an_expired_conversation_no_longer_loads_or_lists(redis_url: str, raw: Redis) -> None:
    async with RedisStore(f"{redis_url}&ttl=0.3") as store:
        await with_messages(store, "c1", "soon gone")
        await store.add_session_event("c1", "session.end", {"transcript": []})
        assert [record.conversation_id for record in await store.list_conversations()] == ["c1"]

        await asyncio.sleep(0.5)

        assert await store.load("c1") is None
        assert await store.list_conversations() == []
        assert await store.session_events("c1") == []
        assert await keys(raw, store.prefix) == set()


async def test_listing_prunes_conversations_whose_record_is_gone(store: RedisStore, raw: Redis) -> None:
    await with_messages(store, "c1", "kept")
    await with_messages(store, "c2", "lost")
    await raw.delete(f"{store.prefix}conversation:c2:record")  # As expiry would.

    assert [record.conversation_id for record in await store.list_conversations()] == ["c1"]
    assert await cast("Awaitable[list[str]]", raw.zrange(f"{store.prefix}index", 0, -1)) == ["c1"]


# --- Atomic writes --------------------------------------------------------------------------------------


async def test_a_conflicting_write_leaves_no_new_keys(store: RedisStore, raw: Redis) -> None:
    await with_messages(store, "c1", "first")
    record = await store.read_record("c1")
    assert record is not None
    before = {key: await cast("Awaitable[bytes | None]", raw.dump(key)) for key in await keys(raw, store.prefix)}
    entry = ConversationEntry(parent_id=record.head_id, message=ModelRequest.user_text_prompt("lost"))
    orphan = ConversationEntry(parent_id="missing", message=ModelRequest.user_text_prompt("orphan"))
    attempts = [
        # A stale revision.
        (dataclasses.replace(record, head_id=entry.id, revision="r2"), [entry], "stale"),
        # A new conversation over an existing one.
        (dataclasses.replace(record, head_id=entry.id, revision="r2"), [entry], None),
        # A head that nothing has.
        (dataclasses.replace(record, conversation_id="c2", head_id="missing"), [], None),
        # A new entry after one that nothing has.
        (dataclasses.replace(record, conversation_id="c2", head_id=orphan.id), [orphan], None),
    ]

    for attempt, new_entries, expected_revision in attempts:
        with pytest.raises(ConversationConflict):
            await store.write_record(attempt, new_entries=new_entries, expected_revision=expected_revision)

    after = {key: await cast("Awaitable[bytes | None]", raw.dump(key)) for key in await keys(raw, store.prefix)}
    assert after == before


async def test_a_write_retried_after_a_lost_reply_is_not_applied_twice(store: RedisStore) -> None:
    await with_messages(store, "c1", "first")
    record = await store.read_record("c1")
    assert record is not None
    entry = ConversationEntry(parent_id=record.head_id, message=ModelRequest.user_text_prompt("once"))
    updated = dataclasses.replace(record, head_id=entry.id, revision="r2")

    await store.write_record(updated, new_entries=[entry], expected_revision=record.revision)
    await store.write_record(updated, new_entries=[entry], expected_revision=record.revision)

    loaded = await store.load("c1")
    assert loaded is not None and prompts(loaded) == ["first", "once"]


async def test_two_stores_writing_one_conversation_lose_no_update(redis_url: str) -> None:
    async with RedisStore(redis_url) as first, RedisStore(redis_url) as second:
        await first.save(Conversation(conversation_id="shared"))

        async def append(store: RedisStore, text: str) -> None:
            while True:
                conversation = await store.load("shared")
                assert conversation is not None
                conversation.messages.append(ModelRequest.user_text_prompt(text))
                try:
                    await store.save(conversation)
                    return
                except ConversationConflict:
                    await asyncio.sleep(0)

        await asyncio.gather(*(append(first if i % 2 else second, f"message {i}") for i in range(20)))

        stored = await second.load("shared")
        assert stored is not None
        assert sorted(prompts(stored)) == sorted(f"message {i}" for i in range(20))


async def test_read_history_is_one_round_trip(store: RedisStore, raw: Redis) -> None:
    await with_messages(store, "c1", *(f"turn {i}" for i in range(10)))
    record = await store.read_record("c1")
    assert record is not None
    await raw.config_resetstat()

    history = await store.read_history(record.head_id)

    stats = await cast("Awaitable[dict[str, dict[str, int]]]", raw.info("commandstats"))
    assert len(history) == 20
    calls = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in stats.items()}
    # One EVALSHA from the store; the HMGETs are the ones its script ran inside Redis.
    assert calls == {"config|resetstat": 1, "evalsha": 1, "hmget": 20}


async def test_deleting_every_conversation_leaves_no_key_behind(store: RedisStore, raw: Redis) -> None:
    await with_messages(store, "original", "one", "two")
    await store.fork("original", new_conversation_id="fork")
    await with_messages(store, "fork", "three")
    await store.add_session_event("original", "session.end", {"transcript": []})
    await store.set_marker("fork", "delivery:abc", "done", ttl=60)
    record = await store.read_record("original")
    assert record is not None and record.head_id is not None
    replacement = ConversationEntry(parent_id=record.head_id, message=ModelRequest.user_text_prompt("new"))
    head = await store.read_entry(record.head_id)
    # Released, but the fork still reaches it: kept until the last conversation holding it goes.
    await store.write_record_replacing(
        dataclasses.replace(record, head_id=replacement.id, revision="r2"),
        new_entries=[dataclasses.replace(replacement, parent_id=head.parent_id)],
        expected_revision=record.revision,
        released=[head.id],
    )
    assert (await store.read_entry(head.id)).id == head.id

    await store.delete("original")
    fork = await store.load("fork")
    assert fork is not None and prompts(fork) == ["one", "two", "three"]
    await store.delete("fork")

    # Only the tombstone of the fork's delivery claim is left, and it expires with the signature window.
    tombstone = f"{store.prefix}marker:0::deleted:fork"
    assert await keys(raw, store.prefix) == {tombstone, f"{store.prefix}conversation::markers"}
    assert 0 < await pttl(raw, tombstone) <= TOMBSTONE_TTL * 1000


async def test_ids_and_scopes_with_any_characters_round_trip(store: RedisStore, raw: Redis) -> None:
    conversation_id, scope = "café:🙂:record", "tenant:ü"
    await store.save(Conversation(conversation_id=conversation_id, messages=exchange("héllo")), scope=scope)
    await store.save(Conversation(conversation_id="café", messages=exchange("other")), scope="tenant")

    loaded = await store.load(conversation_id, scope=scope)
    assert loaded is not None and prompts(loaded) == ["héllo"]
    assert [record.conversation_id for record in await store.list_conversations(scope=scope)] == [conversation_id]
    await store.delete(conversation_id)
    await store.delete("café")
    assert await keys(raw, store.prefix) == set()


# --- Markers ---------------------------------------------------------------------------------------------


async def test_markers_expire_by_redis_ttl(store: RedisStore, raw: Redis) -> None:
    await store.set_marker("c1", "cancel", "turn-1", ttl=0.3)
    (marker,) = [key for key in await keys(raw, store.prefix) if key.startswith(f"{store.prefix}marker:")]
    assert 0 < await pttl(raw, marker) <= 300

    await asyncio.sleep(0.45)

    assert await keys(raw, store.prefix) == set()  # The marker and the index of the conversation's markers.
    assert await store.get_markers([("c1", "cancel")]) == [None]


async def test_marker_keys_cannot_collide(store: RedisStore) -> None:
    await store.set_marker("a:b", "c", "first", ttl=30)
    await store.set_marker("a", "b:c", "second", ttl=30)

    assert await store.get_markers([("a:b", "c"), ("a", "b:c")]) == ["first", "second"]


# --- Rate limits -----------------------------------------------------------------------------------------


async def test_two_stores_on_one_server_share_an_allowance_and_another_prefix_does_not(redis_url: str) -> None:
    async with RedisStore(redis_url) as first, RedisStore(redis_url) as second:
        assert first._client is not second._client  # Two connection pools, as two processes would have.
        await assert_one_allowance(first, second)

        async with RedisStore(redis_url, prefix=f"{first.prefix}other:") as other:
            assert [await other.take_allowance("k", count=3, period=60) for _ in range(3)] == [0.0] * 3


async def test_an_allowance_key_expires_once_it_is_full_again(store: RedisStore, raw: Redis) -> None:
    key = f"{store.prefix}rate:authorize:ip:203.0.113.7"
    await store.take_allowance("authorize:ip:203.0.113.7", count=3, period=0.6)
    assert await keys(raw, store.prefix) == {key}
    assert 100 < await pttl(raw, key) <= 200  # One interval: the allowance is full again then.

    for _ in range(2):
        await store.take_allowance("authorize:ip:203.0.113.7", count=3, period=0.6)
    assert 500 < await pttl(raw, key) <= 600
    stored = await raw.get(key)
    assert await store.take_allowance("authorize:ip:203.0.113.7", count=3, period=0.6) > 0
    assert await raw.get(key) == stored  # A refusal writes nothing.

    await asyncio.sleep(0.65)

    assert await keys(raw, store.prefix) == set()


async def test_an_allowance_uses_the_redis_clock(store: RedisStore, raw: Redis) -> None:
    seconds, microseconds = await raw.time()
    await store.take_allowance("k", count=1, period=10)

    tat = float(await cast("Awaitable[str]", raw.get(f"{store.prefix}rate:k")))
    assert 10 <= tat / 1_000_000 - (seconds + microseconds / 1_000_000) < 11


# --- Outages ---------------------------------------------------------------------------------------------


async def test_a_refused_connection_is_unavailable_quickly_and_hides_the_password() -> None:
    port = free_port()  # Nothing listens there.
    async with RedisStore(f"redis://agent:hunter2@127.0.0.1:{port}/3") as store:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as raised:
            await store.load("c1")
        assert time.monotonic() - started < 3
    message = str(raised.value)
    assert f"127.0.0.1:{port}/3" in message
    assert "hunter2" not in message


async def test_a_refused_connection_makes_an_allowance_unavailable_without_the_password() -> None:
    port = free_port()  # Nothing listens there.
    async with RedisStore(f"redis://agent:hunter2@127.0.0.1:{port}/3") as store:
        with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{port}/3") as raised:
            await store.take_allowance("k", count=1, period=60)
    assert "hunter2" not in str(raised.value)


async def test_a_restarted_server_is_unavailable_while_down_then_works_again() -> None:
    server = RedisServer().start()
    try:
        async with RedisStore(server.url) as store:
            await with_messages(store, "c1", "before")
            server.stop()

            with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{server.port}/0"):
                await store.load("c1")
            with pytest.raises(StoreUnavailableError):
                await with_messages(store, "c2", "while down")

            server = RedisServer(port=server.port).start()  # Empty: it kept nothing on disk.
            await with_messages(store, "c3", "after")
            loaded = await store.load("c3")
            assert loaded is not None and prompts(loaded) == ["after"]
    finally:
        server.stop()


# --- Configuration ---------------------------------------------------------------------------------------


async def test_open_store_parses_prefix_ttl_and_passes_other_options_to_redis_py() -> None:
    async with open_store("redis://:hunter2@127.0.0.1:6390/2?prefix=app:&ttl=3600&socket_timeout=2") as store:
        assert isinstance(store, RedisStore)
        assert (store.prefix, store.ttl) == ("app:", 3600)
        assert store.description == "Redis at 127.0.0.1:6390/2 (prefix 'app:', retention 1 hour)"
        options = store._client.connection_pool.connection_kwargs
        assert (options["socket_timeout"], options["socket_connect_timeout"], options["db"]) == (2.0, 5.0, 2)
        assert options["password"] == "hunter2"
        assert "prefix" not in options and "ttl" not in options


async def test_the_store_timeout_sets_both_socket_timeouts_unless_the_url_does() -> None:
    async with open_store("redis://127.0.0.1:6390/0", timeout=1.5) as store:
        assert isinstance(store, RedisStore)
        options = store._client.connection_pool.connection_kwargs
        assert (options["socket_timeout"], options["socket_connect_timeout"]) == (1.5, 1.5)
    async with open_store("redis://127.0.0.1:6390/0?socket_timeout=2", timeout=1.5) as store:
        assert isinstance(store, RedisStore)
        options = store._client.connection_pool.connection_kwargs
        assert (options["socket_timeout"], options["socket_connect_timeout"]) == (2.0, 1.5)


@pytest.mark.parametrize(
    ("url", "description"),
    [
        ("redis://localhost", "Redis at localhost:6379/0 (prefix 'layercode-agent:', kept until deleted)"),
        (
            "rediss://user:hunter2@cache.example.com:6380/1?ttl=604800",
            "Redis over TLS at cache.example.com:6380/1 (prefix 'layercode-agent:', retention 7 days)",
        ),
        ("redis://:hunter2@[::1]:7000?ttl=90&prefix=x:", "Redis at [::1]:7000/0 (prefix 'x:', retention 90 seconds)"),
        ("redis://h/5?ttl=1.5", "Redis at h:6379/5 (prefix 'layercode-agent:', retention 1.5 seconds)"),
    ],
)
async def test_the_description_names_the_server_and_retention_but_no_password(url: str, description: str) -> None:
    async with open_store(url) as store:
        assert store.description == description


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?ttl=0", r"ttl\) must be a positive number of seconds \(got 0.0\)"),
        ("?ttl=-5", r"must be a positive number of seconds \(got -5.0\)"),
        ("?ttl=inf", "must be a positive number of seconds"),
        ("?ttl=soon", r"must be a number of seconds \(got 'soon'\)"),
        ("?ttl=1&ttl=2", "gives 'ttl' more than once"),
        ("?prefix=", "prefix must not be empty"),
        ("?decode_responses=false", "cannot set decode_responses"),
        ("?socket_timeout=slow", "option redis-py does not accept"),
        ("?no_such_option=1", "option redis-py does not accept.*no_such_option"),
    ],
)
async def test_open_store_rejects_bad_options_without_echoing_the_password(query: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as raised:
        open_store(f"redis://user:hunter2@localhost:6379/0{query}")
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://user:hunter2@localhost:port/0", "port is not a number"),
        ("redis://user:hunter2@[::1/0", "URL is malformed: Invalid IPv6 URL"),
        ("redis://user:hunter2@localhost:6379/zero", r"database must be a number such as /0 \(got 'zero'\)"),
    ],
)
async def test_open_store_rejects_a_malformed_redis_url(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as raised:
        open_store(url)
    assert "hunter2" not in str(raised.value)


async def test_constructor_options_override_the_url() -> None:
    async with RedisStore("redis://localhost/0?prefix=url:&ttl=5", prefix="arg:", ttl=10) as store:
        assert (store.prefix, store.ttl) == ("arg:", 10)
    with pytest.raises(StoreError, match="positive"):
        RedisStore("redis://localhost/0", ttl=0)


async def test_a_closed_store_refuses_work(redis_url: str) -> None:
    store = RedisStore(redis_url)
    await store.aclose()
    await store.aclose()

    with pytest.raises(StoreError, match="closed"):
        await store.load("c1")
