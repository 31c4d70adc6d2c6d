"""What the SQLite backend promises beyond the contract: durability, migrations, locking, several processes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationConflict, ConversationEntry, ConversationRecord
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

from layercode_agent.stores import (
    LogWrite,
    MemoryStore,
    SQLiteStore,
    StoreError,
    StoreUnavailableError,
    open_store,
)
from layercode_agent.stores.sqlite import SCHEMA_VERSION, _Pool  # pyright: ignore[reportPrivateUsage]

from ..fakes.stalled_disk import hit_path, stalling_connect
from .sharing import assert_one_allowance

pytestmark = pytest.mark.anyio


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "conversations.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(db_path) as opened:
        yield opened


def exchange(prompt: str) -> list[ModelRequest | ModelResponse]:
    return [ModelRequest.user_text_prompt(prompt), ModelResponse(parts=[TextPart(content=f"answer to {prompt}")])]


def pragma(path: Path, name: str) -> object:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        connection.close()


async def test_opens_in_wal_mode_with_the_current_schema(store: SQLiteStore, db_path: Path) -> None:
    assert await anyio.Path(db_path).exists()
    assert pragma(db_path, "journal_mode") == "wal"
    assert pragma(db_path, "user_version") == SCHEMA_VERSION
    connection = sqlite3.connect(db_path)
    try:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        connection.close()
    assert {"records", "entries", "session_events"} <= tables
    assert store.description == f"SQLite at {db_path}"


async def test_conversations_survive_reopening(db_path: Path) -> None:
    messages = exchange("remember me")
    async with SQLiteStore(db_path) as first:
        await first.save(Conversation(conversation_id="c1", messages=messages))
        await first.add_session_event("c1", "session.end", {"transcript": ["remember me"]}, session_id="s1")

    async with SQLiteStore(db_path) as second:
        loaded = await second.load("c1")
        events = await second.session_events("c1")

    assert loaded is not None and loaded.messages == messages
    assert [event.payload for event in events] == [{"transcript": ["remember me"]}]


async def test_reopening_the_current_schema_changes_nothing(db_path: Path) -> None:
    async with SQLiteStore(db_path):
        pass
    async with SQLiteStore(db_path):
        pass

    assert pragma(db_path, "user_version") == SCHEMA_VERSION


async def test_a_database_from_newer_code_is_refused(db_path: Path) -> None:
    async with SQLiteStore(db_path):
        pass
    connection = sqlite3.connect(db_path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()

    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        SQLiteStore(db_path)


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    await anyio.Path(path).write_text("not a database, just a long enough line of text to fill the header " * 10)

    with pytest.raises(StoreError, match=str(path)):
        SQLiteStore(path)


async def test_a_held_write_lock_surfaces_as_unavailable(db_path: Path) -> None:
    async with SQLiteStore(db_path, busy_timeout_ms=20) as store:
        await store.save(Conversation(conversation_id="c1", messages=exchange("one")))
        loaded = await store.load("c1")
        assert loaded is not None
        loaded.messages.extend(exchange("two"))
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailableError, match="locked"):
                await store.save(loaded)
            assert await store.load("c1") is not None  # WAL: reads go on while another writer holds the lock.
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

        await store.save(loaded)  # Nothing was half-written, so the same save now succeeds.
        stored = await store.load("c1")
        assert stored is not None and stored.messages == loaded.messages


async def test_a_write_after_a_released_entry_conflicts_and_writes_nothing(store: SQLiteStore) -> None:
    orphan = ConversationEntry(parent_id="gone", message=ModelRequest.user_text_prompt("lost"))
    record = ConversationRecord(conversation_id="c1", head_id=orphan.id)

    with pytest.raises(ConversationConflict):
        await store.write_record(record, new_entries=[orphan], expected_revision=None)

    assert await store.read_record("c1") is None
    with pytest.raises(LookupError):
        await store.read_entry(orphan.id)


async def test_a_missing_head_or_broken_chain_is_a_lookup_error(store: SQLiteStore) -> None:
    with pytest.raises(LookupError):
        await store.read_history("missing")
    await store.save(Conversation(conversation_id="c1", messages=exchange("one")))
    entries = await store.load_entries("c1")
    assert entries is not None
    assert await store.read_history(entries[-1].id, limit=1) == entries[-1:]
    assert await store.read_history(None) == []


async def test_read_entry_returns_the_stored_entry(store: SQLiteStore) -> None:
    await store.save(Conversation(conversation_id="c1", messages=exchange("one")))
    entries = await store.load_entries("c1")
    assert entries is not None

    assert await store.read_entry(entries[1].id) == entries[1]


async def test_a_record_pointing_at_a_missing_head_conflicts(store: SQLiteStore) -> None:
    with pytest.raises(ConversationConflict):
        await store.write_record(ConversationRecord(conversation_id="c1", head_id="gone"), expected_revision=None)


async def test_damaged_rows_are_reported_not_misread(store: SQLiteStore, db_path: Path) -> None:
    message = '{"kind": "request", "parts": [{"part_kind": "user-prompt", "content": "hi"}]}'
    connection = sqlite3.connect(db_path)  # Foreign keys are off on this connection, as in a hand-edited file.
    with connection:
        connection.execute("INSERT INTO entries VALUES ('orphan', 'gone', 'c1', 'message', ?)", (message,))
        connection.execute("INSERT INTO entries VALUES ('summary', NULL, 'c1', 'summary', ?)", (message,))
    connection.close()

    with pytest.raises(LookupError):
        await store.read_history("orphan")
    with pytest.raises(StoreError, match="kind 'summary'"):
        await store.read_history("summary")


async def test_a_path_below_a_file_is_refused(tmp_path: Path) -> None:
    await anyio.Path(tmp_path / "file").write_text("")

    with pytest.raises(StoreError, match="Cannot open"):
        SQLiteStore(tmp_path / "file" / "conversations.db")


async def test_a_closed_store_refuses_work(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    await store.aclose()
    await store.aclose()

    with pytest.raises(StoreError, match="closed"):
        await store.load("c1")


def count_entries(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        return int(connection.execute("SELECT count(*) FROM entries").fetchone()[0])
    finally:
        connection.close()


@pytest.mark.parametrize("seed", range(4))
async def test_deleting_collects_the_same_entries_as_the_memory_store(db_path: Path, seed: int) -> None:
    """Random saves, rewrites, forks, branches and deletes: SQLite keeps exactly what pydantic-ai's reference keeps."""
    rng = random.Random(seed)
    memory = MemoryStore()
    live: list[str] = []
    async with SQLiteStore(db_path) as sqlite:
        for step in range(80):
            message = ModelRequest.user_text_prompt(f"message {step}")
            operation = (
                rng.choice(["new", "append", "append", "rewrite", "fork", "branch", "delete"]) if live else "new"
            )
            conversation_id = rng.choice(live) if live else ""
            if operation == "new":
                live.append(f"c{step}")
            elif operation == "fork":
                live.append(f"fork{step}")
            elif operation == "delete":
                live.remove(conversation_id)
            cut = rng.random()
            for store in (memory, sqlite):
                loaded = await store.load(conversation_id) if operation != "new" else None
                at = round(cut * len(loaded.messages)) if loaded is not None else 0
                if operation == "new":
                    await store.save(Conversation(conversation_id=live[-1], messages=[message]))
                elif operation == "append" and loaded is not None:
                    loaded.messages.append(message)
                    await store.save(loaded)
                elif operation == "rewrite" and loaded is not None:
                    rewritten = [*loaded.messages[:at], message]
                    await store.save(
                        Conversation(conversation_id=conversation_id, messages=rewritten, revision=loaded.revision)
                    )
                elif operation == "fork":
                    await store.fork(conversation_id, at=at, new_conversation_id=live[-1])
                elif operation == "branch" and loaded is not None:
                    await store.branch(conversation_id, at=at, expected_revision=loaded.revision)
                elif operation == "delete":
                    await store.delete(conversation_id)
            for kept in live:
                expected, actual = await memory.load(kept), await sqlite.load(kept)
                assert expected is not None and actual is not None
                assert actual.messages == expected.messages
            assert count_entries(db_path) == len(memory._entries), (step, operation)


WRITER = """
import asyncio, sys, time
from pathlib import Path
from pydantic_ai.conversation_store import ConversationConflict, ConversationEntry, ConversationRecord
from pydantic_ai.messages import ModelRequest
from layercode_agent.stores import LogWrite, SQLiteStore

def appending(message):
    def plan(record, history):
        entry = ConversationEntry(parent_id=history[-1].id if history else None, message=message)
        return None, LogWrite(ConversationRecord(conversation_id="shared", head_id=entry.id), [entry])
    return plan

async def main(path: str, name: str, count: int, ready: str, other: str, how: str) -> None:
    conflicts = 0
    async with SQLiteStore(path) as store:
        Path(ready).touch()
        while not Path(other).exists():  # Start together, so the writes really interleave.
            await asyncio.sleep(0.005)
        for index in range(count):
            message = ModelRequest.user_text_prompt(f"{name} {index}")
            if how == "rewrite":  # One transaction: nothing to retry.
                await store.rewrite("shared", appending(message))
                continue
            while True:
                conversation = await store.load("shared")
                assert conversation is not None
                conversation.messages.append(message)
                try:
                    await store.save(conversation)
                    break
                except ConversationConflict:
                    conflicts += 1
    print(conflicts)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]))
"""


@pytest.mark.parametrize("how", ["save", "rewrite"])
async def test_two_processes_appending_lose_no_update(db_path: Path, tmp_path: Path, how: str) -> None:
    count = 30
    async with SQLiteStore(db_path) as store:
        await store.save(Conversation(conversation_id="shared"))
    ready = {name: str(tmp_path / f"{name}.ready") for name in ("a", "b")}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            str(db_path),
            name,
            str(count),
            ready[name],
            ready["b" if name == "a" else "a"],
            how,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for name in ("a", "b")
    ]
    outputs = [await process.communicate() for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()

    async with SQLiteStore(db_path) as store:
        stored = await store.load("shared")
    assert stored is not None
    prompts = [
        part.content for message in stored.messages for part in message.parts if isinstance(part, UserPromptPart)
    ]
    for name in ("a", "b"):
        assert [prompt for prompt in prompts if str(prompt).startswith(name)] == [f"{name} {i}" for i in range(count)]
    assert len(prompts) == 2 * count


async def test_a_rewrite_is_one_call_on_a_pool_thread(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    await store.save(Conversation(conversation_id="c1", messages=exchange("one")))
    calls: list[object] = []
    run = store._pool.run  # pyright: ignore[reportPrivateUsage]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return run(*args, **kwargs)

    monkeypatch.setattr(store._pool, "run", counted)  # pyright: ignore[reportPrivateUsage]

    def plan(record: ConversationRecord | None, history: list[ConversationEntry]) -> tuple[int, LogWrite | None]:
        entry = ConversationEntry(parent_id=history[-1].id, message=ModelRequest.user_text_prompt("two"))
        assert record is not None
        return len(history), LogWrite(dataclasses.replace(record, head_id=entry.id, revision="next"), [entry])

    assert await store.rewrite("c1", plan) == 2
    assert len(calls) == 1
    record, history = await store.read_log("c1")
    assert len(calls) == 2  # And a read is one too.
    assert record is not None and record.revision == "next" and len(history) == 3


async def test_a_broken_chain_under_a_rewrite_is_a_store_error(store: SQLiteStore, db_path: Path) -> None:
    await store.save(Conversation(conversation_id="c1", messages=exchange("one")))
    entries = await store.load_entries("c1")
    assert entries is not None
    connection = sqlite3.connect(db_path)
    try:
        connection.execute("PRAGMA foreign_keys = OFF")
        connection.execute("DELETE FROM entries WHERE id = ?", (entries[0].id,))
        connection.commit()
    finally:
        connection.close()

    with pytest.raises(StoreError, match="broken"):
        await store.rewrite("c1", lambda record, history: (None, None))


async def test_open_store_sqlite_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///data/conversations.db")
    async with store:
        assert isinstance(store, SQLiteStore)
        assert store.path == Path("data/conversations.db")
        assert store.description == "SQLite at data/conversations.db"
    assert await anyio.Path(tmp_path / "data" / "conversations.db").exists()


async def test_open_store_sqlite_with_four_slashes_is_absolute(tmp_path: Path) -> None:
    path = tmp_path / "absolute.db"
    assert str(path).startswith("/")

    async with open_store(f"sqlite:///{path}") as store:
        assert isinstance(store, SQLiteStore)
        assert store.path == path
    assert await anyio.Path(path).exists()


async def test_open_store_memory() -> None:
    async with open_store("memory://") as store:
        assert isinstance(store, MemoryStore)
        assert store.description == "in memory (single process only)"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://user:hunter2@db/agent", "Unsupported store URL scheme 'postgres'; use memory://"),
        ("data/conversations.db", "has no scheme"),
        ("sqlite://", "sqlite:///relative/path.db"),
        ("sqlite:///", "sqlite:///relative/path.db"),
        ("memory://somewhere", "takes no path"),
    ],
)
async def test_open_store_rejects_what_it_cannot_open(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as raised:
        open_store(url)
    assert "hunter2" not in str(raised.value)


# --- Rate limits ------------------------------------------------------------------------------------------


def rate_rows(path: Path) -> list[tuple[str, str, float]]:
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute("SELECT conversation_id, name, expires_at FROM markers WHERE name LIKE 'rate:%'")
        return [(str(conversation_id), str(name), float(expires_at)) for conversation_id, name, expires_at in rows]
    finally:
        connection.close()


async def test_two_stores_on_one_file_share_an_allowance(db_path: Path) -> None:
    async with SQLiteStore(db_path) as first, SQLiteStore(db_path) as second:
        await assert_one_allowance(first, second)


async def test_an_allowance_is_a_marker_row_swept_once_it_is_full_again(store: SQLiteStore, db_path: Path) -> None:
    before = time.time()
    await store.take_allowance("a", count=2, period=0.2)

    ((conversation_id, name, expires_at),) = rate_rows(db_path)
    assert (conversation_id, name) == ("", "rate:a")
    assert before + 0.1 <= expires_at <= time.time() + 0.1  # The theoretical arrival time: one interval on.

    await asyncio.sleep(0.15)
    await store.take_allowance("b", count=2, period=0.2)

    assert [name for _, name, _ in rate_rows(db_path)] == ["rate:b"]


async def test_a_held_write_lock_makes_an_allowance_unavailable(db_path: Path) -> None:
    async with SQLiteStore(db_path, busy_timeout_ms=20) as store:
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailableError, match="locked"):
                await store.take_allowance("k", count=1, period=60)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

        assert await store.take_allowance("k", count=1, period=60) == 0.0  # Nothing was taken while locked.


# --- Deadlines: a stalled disk --------------------------------------------------------------------------


@pytest.fixture
def stall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A flag file: while it exists, statements of connections opened from now on naming its text block."""
    flag = tmp_path / "stall"
    monkeypatch.setattr(sqlite3, "connect", stalling_connect(flag))
    try:
        yield flag
    finally:
        flag.unlink(missing_ok=True)  # Thaw, so no worker thread is left blocked.


async def wait_until_stalled(flag: Path) -> None:
    with anyio.fail_after(60):
        while True:
            if await anyio.Path(hit_path(flag)).exists():
                return
            await anyio.sleep(0.01)


async def test_a_stalled_call_gives_up_at_its_deadline_and_others_go_on(db_path: Path, stall: Path) -> None:
    async with SQLiteStore(db_path, timeout=0.5) as store:
        one = exchange("one")
        await store.save(Conversation(conversation_id="stalled", messages=one))
        await anyio.Path(stall).write_text("stalled")
        with anyio.fail_after(60), pytest.raises(StoreUnavailableError, match=r"did not answer within 0\.5 s"):
            await store.load("stalled")
        assert await anyio.Path(stall).exists()  # Still stuck: the deadline ended the call, not the disk.

        # The stuck call holds one connection and thread; other conversations read and write meanwhile.
        messages = exchange("two")
        await store.save(Conversation(conversation_id="other", messages=messages))
        other = await store.load("other")
        assert other is not None and other.messages == messages

        await anyio.Path(stall).unlink()
        loaded = await store.load("stalled")
        assert loaded is not None and loaded.messages == one


async def test_a_write_stalled_past_its_deadline_rolls_back_and_blocks_nobody_for_longer(
    db_path: Path, stall: Path
) -> None:
    async with SQLiteStore(db_path, timeout=0.5) as store:
        # Only the rows of this message name it, so the stall is inside the write transaction.
        await anyio.Path(stall).write_text("never stored")
        with anyio.fail_after(60), pytest.raises(StoreUnavailableError, match="did not answer"):
            await store.save(Conversation(conversation_id="stalled", messages=exchange("never stored")))
        await wait_until_stalled(stall)  # Stuck inside its transaction, holding the write lock.

        # Another conversation's write waits for that lock only until its own deadline.
        with anyio.fail_after(60), pytest.raises(StoreUnavailableError):
            await store.save(Conversation(conversation_id="other", messages=exchange("two")))
        assert await store.load("other") is None  # Reads go on, and nothing was half-written.

        await anyio.Path(stall).unlink()  # The stuck write finishes, after its caller gave up: it must not commit.
        again = exchange("again")
        with anyio.fail_after(60):
            while True:
                try:
                    await store.save(Conversation(conversation_id="stalled", messages=again))
                    break
                except StoreUnavailableError:  # The stuck write still holds the lock: wait for it.
                    await anyio.sleep(0.05)
        loaded = await store.load("stalled")
        assert loaded is not None and loaded.messages == again
    assert count_entries(db_path) == 2  # The rolled-back write left no entry behind.


async def test_ping_writes_and_fails_while_the_disk_is_stalled(db_path: Path, stall: Path) -> None:
    async with SQLiteStore(db_path, timeout=0.5) as store:
        await store.ping()
        await anyio.Path(stall).write_text("*")
        with anyio.fail_after(60), pytest.raises(StoreUnavailableError):
            await store.ping()
        await anyio.Path(stall).unlink()
        with anyio.fail_after(60):
            while True:
                try:
                    await store.ping()
                    break
                except StoreUnavailableError:
                    await anyio.sleep(0.05)


async def test_ping_fails_while_another_process_holds_the_write_lock(db_path: Path) -> None:
    async with SQLiteStore(db_path, timeout=0.5) as store:
        await store.ping()
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with anyio.fail_after(60), pytest.raises(StoreUnavailableError):
                await store.ping()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await store.ping()


# --- File modes ---------------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_folder_and_the_database_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "conversations.db"
    previous = os.umask(0o022)  # The common default, which would leave them readable by everyone.
    try:
        async with SQLiteStore(path) as store:
            await store.save(Conversation(conversation_id="c1", messages=exchange("one")))
            files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
            assert [mode(file) for file in files] == [0o600, 0o600, 0o600]
    finally:
        os.umask(previous)
    assert mode(path.parent) == 0o700
    assert mode(path) == 0o600


async def test_an_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o750)
    folder.chmod(0o750)
    async with SQLiteStore(folder / "conversations.db"):
        pass
    assert mode(folder) == 0o750
    assert mode(folder / "conversations.db") == 0o600


async def test_the_pool_runs_calls_on_its_threads_and_never_one_whose_caller_left() -> None:
    pool = _Pool(1, "test-pool")
    release = threading.Event()
    ran: list[str] = []
    try:
        assert await pool.run(threading.current_thread, 10) is not threading.current_thread()
        with pytest.raises(ValueError, match="boom"):
            await pool.run(lambda: (_ for _ in ()).throw(ValueError("boom")), 10)
        blocked = pool.run(lambda: release.wait(60), 60)  # Holds the only thread.
        with pytest.raises(TimeoutError):
            await pool.run(lambda: ran.append("timed out"), 0.05)
        left = pool.run(lambda: ran.append("cancelled"), 60)
        left.cancel()
        last = pool.run(lambda: ran.append("last"), 60)
        release.set()
        assert await blocked is True
        await last
        assert ran == ["last"]
    finally:
        release.set()
        pool.shutdown()
