"""A `ConversationStore` in one SQLite file: conversations survive restarts and workers on one host share them.

Why it is shaped like this:

- **WAL journal, `busy_timeout`, `synchronous=NORMAL`**: readers never block the writer, a writer waits
  (up to `busy_timeout_ms`) for another instead of failing at once, and a commit costs no fsync.
  Durability after an OS crash may lose the last commits; a process crash loses nothing.
- **A small pool of worker threads, each call on a connection of its own**: sqlite3 blocks, and a voice
  turn's event loop must not. Every operation is one hop to a pool thread, and a write is one
  `BEGIN IMMEDIATE` transaction there, so the revision check and the write cannot interleave with
  another writer's. A caller cancelled mid-save (barge-in) does not cancel the transaction: it commits
  or rolls back whole. Writes of this process take turns on a lock (no busy-wait between them).
- **A turn's change is one hop** (`rewrite`): the record and history are read, the turn's pure
  decision runs and its write lands in one transaction on the pool thread, so it never conflicts and
  never retries; a hop costs 0.1 to 0.3 ms of waiting on this kind of machine, and a turn used to make
  three for each of its two changes. Entries parsed once are kept (`_cache`), so a long conversation
  is not parsed again on every read.
- **Every call has a deadline** (`timeout`, `STORE_TIMEOUT`): a disk that stalls (a frozen or failing
  file system) makes the call raise `StoreUnavailableError` when it passes, as Redis's socket timeout
  does, so the caller hears an apology instead of silence. The stuck thread keeps its connection until
  the disk answers; the other calls go on on the others, so one stuck call never holds up another
  conversation for longer than its own deadline. A transaction that reaches its `COMMIT` after its
  deadline rolls back instead; one whose `COMMIT` was already under way when the deadline passed may
  still land, which the revision checks handle like any other writer's (the next writer sees the new
  revision). A call the pool has not started by its deadline never runs.
- **Private files**: the folder is created 0700 and the database 0600 before SQLite opens it; SQLite
  gives its `-wal` and `-shm` files the database's mode. A database created by an earlier version keeps
  its mode (`chmod 600` it).
- **Versioned schema**: `PRAGMA user_version` counts the migrations applied; all pending ones run in
  one transaction at open, and a database written by newer code is refused rather than misread.

Deleting a conversation removes its record, its session events, its markers and every message no
remaining conversation reaches (as its head or a branch it left), including replaced ones it wrote.
Messages a fork shares stay for the fork; they go when the last conversation reaching them is deleted.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from pydantic_ai.conversation_store import ConversationConflict, ConversationEntry, ConversationRecord

from ._cache import EntryCache
from ._serialization import (
    dump_message,
    dump_payload,
    dump_record,
    format_timestamp,
    load_message,
    load_payload,
    load_record,
    parse_timestamp,
)
from .base import (
    AgentStore,
    LogPlan,
    LogWrite,
    SessionEventRecord,
    StoreError,
    StoreUnavailableError,
    kept_changing,
)

__all__ = ["DEFAULT_TIMEOUT", "POOL_SIZE", "SCHEMA_VERSION", "SQLiteStore"]

_T = TypeVar("_T")

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: records, the message log, and Layercode session events.
    (
        """
        CREATE TABLE entries (
            id TEXT PRIMARY KEY,
            parent_id TEXT REFERENCES entries (id),
            conversation_id TEXT NOT NULL,  -- the conversation that first wrote it; forks share it
            kind TEXT NOT NULL,
            message TEXT NOT NULL
        )
        """,
        "CREATE INDEX entries_parent_id ON entries (parent_id)",
        """
        CREATE TABLE records (
            conversation_id TEXT PRIMARY KEY,
            revision TEXT NOT NULL,
            head_id TEXT REFERENCES entries (id),
            scope TEXT,
            updated_at TEXT NOT NULL,
            branches TEXT NOT NULL,  -- JSON array of entry ids, copied out of `record` to find references
            record TEXT NOT NULL
        )
        """,
        "CREATE INDEX records_updated_at ON records (updated_at)",
        "CREATE INDEX records_scope_updated_at ON records (scope, updated_at)",
        "CREATE INDEX records_head_id ON records (head_id)",
        "CREATE INDEX records_with_branches ON records (conversation_id) WHERE branches <> '[]'",
        """
        CREATE TABLE session_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            session_id TEXT,
            received_at TEXT NOT NULL,
            payload TEXT NOT NULL
        )
        """,
        "CREATE INDEX session_events_conversation_id ON session_events (conversation_id, id)",
    ),
    # 2: markers, the short-lived values workers coordinate through (delivery claims, cancel requests).
    (
        """
        CREATE TABLE markers (
            conversation_id TEXT NOT NULL,
            name TEXT NOT NULL,
            value TEXT NOT NULL,
            expires_at REAL NOT NULL,  -- Unix time: every process on the host shares the clock
            PRIMARY KEY (conversation_id, name)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX markers_expires_at ON markers (expires_at)",
    ),
)
"""Schema changes in order; migration `n` (1-based) brings `user_version` from `n - 1` to `n`. Only ever append."""

SCHEMA_VERSION = len(_MIGRATIONS)
"""The `PRAGMA user_version` this code writes and understands."""

_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})

DEFAULT_TIMEOUT = 5.0
"""Seconds a store call may take by default, as long as the Redis store's socket timeouts."""

POOL_SIZE = 4
"""Worker threads (each with its connection) per store: how many calls may be stuck on a stalled disk before
the others wait for a free thread too (and then give up at their own deadline)."""

_call = threading.local()
"""The call a pool thread is running: `deadline` (monotonic seconds) and `write_lock`, read by `_transaction`."""

_HISTORY_SQL = """
WITH RECURSIVE chain (id, parent_id, kind, message, depth) AS (
    SELECT id, parent_id, kind, message, 1 FROM entries WHERE id = :head_id
    UNION ALL
    SELECT entries.id, entries.parent_id, entries.kind, entries.message, chain.depth + 1
    FROM entries JOIN chain ON entries.id = chain.parent_id
    WHERE chain.depth <> :limit
)
SELECT id, parent_id, kind, message FROM chain ORDER BY depth DESC
"""
"""A history from its head back to its first entry (or `:limit` entries), oldest first, in one query."""

_DELETE_UNREACHABLE_SQL = """
WITH RECURSIVE
    -- Everything the deleted record reached: its history and the branches it left.
    released (id) AS (
        SELECT value FROM json_each(:tips)
        UNION
        SELECT entries.parent_id FROM entries JOIN released ON entries.id = released.id
        WHERE entries.parent_id IS NOT NULL
    ),
    -- Those entries and everything written after them: any record that still reaches a released
    -- entry has its head or a branch in here.
    family (id) AS (
        SELECT id FROM released
        UNION
        SELECT entries.id FROM entries JOIN family ON entries.parent_id = family.id
    ),
    other_tips (id) AS (
        SELECT records.head_id FROM records JOIN family ON records.head_id = family.id
        UNION
        SELECT branch.value FROM records, json_each(records.branches) AS branch
        WHERE records.branches <> '[]' AND branch.value IN (SELECT id FROM family)
    ),
    reachable (id) AS (
        SELECT id FROM other_tips
        UNION
        SELECT entries.parent_id FROM entries JOIN reachable ON entries.id = reachable.id
        WHERE entries.parent_id IS NOT NULL
    )
DELETE FROM entries WHERE id IN (SELECT id FROM family EXCEPT SELECT id FROM reachable)
"""
"""Delete the entries of the family a deleted record reached that no remaining record reaches.

Bounded by the deleted conversation and its forks, not by the size of the database.
"""

_DELETE_IF_UNREFERENCED_SQL = """
DELETE FROM entries WHERE id = :id
AND NOT EXISTS (SELECT 1 FROM entries AS child WHERE child.parent_id = :id)
AND NOT EXISTS (SELECT 1 FROM records WHERE head_id = :id)
AND NOT EXISTS (
    SELECT 1 FROM records, json_each(records.branches) AS branch
    WHERE records.branches <> '[]' AND branch.value = :id
)
"""
"""Delete an entry a replaced history released, unless an entry, a head or a branch still points at it."""


class SQLiteStore(AgentStore):
    """Conversations, their messages and session events in one SQLite database file.

    Several processes may open the same file: a save that lost a race raises
    `ConversationConflict`, never overwrites. Call `aclose()` (or use `async with`) when done.
    """

    def __init__(
        self, path: str | Path, *, timeout: float = DEFAULT_TIMEOUT, busy_timeout_ms: int | None = None
    ) -> None:
        """Open (creating if needed) the database at `path` and bring its schema up to date.

        Args:
            path: The database file; a missing parent folder is created (mode 0700), and the file (mode 0600).
            timeout: Seconds a call may take, from the moment it is made, before `StoreUnavailableError`.
            busy_timeout_ms: How long a write waits for another process's write lock before
                `StoreUnavailableError` (default: `timeout`).

        Raises:
            StoreError: If the file cannot be opened, is not a database, or was written by newer code.
            ValueError: If `timeout` is not a positive, finite number.
        """
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive, finite number of seconds (got {timeout!r})")
        self._path = Path(path)
        self._timeout = timeout
        self._busy_timeout_ms = busy_timeout_ms if busy_timeout_ms is not None else math.ceil(timeout * 1000)
        self._closed = False
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        """Connections no call is using; at most one per pool thread ever exists."""
        self._write_lock = threading.Lock()
        self._entries = EntryCache()
        """The entries `read_log` and `rewrite` parsed, for the next turn's read (see `_cache`)."""
        self._ping: asyncio.Task[None] | None = None
        self._idle.append(self._open())
        self._pool = _Pool(POOL_SIZE, "sqlite-store")

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def description(self) -> str:
        """Human text for the start-up banner."""
        return f"SQLite at {self._path}"

    @property
    def timeout(self) -> float:
        """Seconds a call may take before `StoreUnavailableError`."""
        return self._timeout

    async def aclose(self) -> None:
        """Close the connections (the last one checkpoints the WAL) and stop the pool. Safe to call twice.

        A connection still held by a call stuck on a stalled disk is closed when that call returns.

        Raises:
            StoreUnavailableError: If closing did not finish within the deadline.
        """
        if self._closed:
            return
        self._closed = True
        if self._ping is not None:
            self._ping.cancel()
        with self._pool_lock:
            idle, self._idle = self._idle, []
        try:
            await self._pool.run(partial(self._close_all, idle), self._timeout)
        except TimeoutError:
            raise self._late() from None
        finally:
            self._pool.shutdown()

    async def ping(self) -> None:
        """Write one marker row through to the file (so a frozen disk shows), within the store's deadline.

        At most one ping runs at a time: a caller that gave up on one (a readiness check's own shorter
        deadline) leaves it to finish, and the next caller waits for that one rather than taking another
        thread.

        Raises:
            StoreError: If the write fails or does not finish in time.
        """
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._run(_ping))
            self._ping.add_done_callback(_retrieve)
        await asyncio.shield(self._ping)

    # --- ConversationStore primitives -------------------------------------------------------------

    async def read_record(self, conversation_id: str) -> ConversationRecord | None:
        """The record for a conversation, or `None` if the store doesn't have it."""
        return await self._run(partial(_read_record, conversation_id=conversation_id))

    async def read_records(self, *, scope: str | None = None, limit: int | None = None) -> Sequence[ConversationRecord]:
        """The stored records, or those with `scope`, most recently saved first, at most `limit` of them."""
        return await self._run(partial(_read_records, scope=scope, limit=limit))

    async def write_record(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
    ) -> None:
        """Store `record` and its new entries in one transaction, if the stored revision is `expected_revision`.

        Raises:
            ConversationConflict: If another writer saved or deleted the conversation first, or the
                history it continues was released by a concurrent delete.
        """
        await self._write(record, new_entries, expected_revision, ())

    async def write_record_replacing(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
        released: Sequence[str] = (),
    ) -> None:
        """`write_record`, deleting in the same transaction the `released` entries nothing else reaches.

        Raises:
            ConversationConflict: As `write_record`.
        """
        await self._write(record, new_entries, expected_revision, released)

    async def _write(
        self,
        record: ConversationRecord,
        new_entries: Sequence[ConversationEntry],
        expected_revision: str | None,
        released: Sequence[str],
    ) -> None:
        # Serialised here, before the hop, so later changes to the objects can't leak into the write.
        row, entries = _record_row(record), _entry_rows(record, new_entries)
        await self._run(
            partial(
                _write_record, row=row, entries=entries, expected_revision=expected_revision, released=list(released)
            )
        )

    async def delete_record(self, conversation_id: str, *, expected_revision: str) -> None:
        """Delete the record, its session events and markers, and the entries no remaining record or branch reaches.

        Raises:
            ConversationConflict: If no record with `expected_revision` is stored.
        """
        await self._run(partial(_delete_record, conversation_id=conversation_id, expected_revision=expected_revision))

    async def read_entry(self, entry_id: str) -> ConversationEntry:
        """The entry with this identifier.

        Raises:
            KeyError: If the store doesn't have it.
        """
        entries = await self._run(partial(_read_history, head_id=entry_id, limit=1))
        return entries[0]

    async def read_history(self, head_id: str | None, *, limit: int | None = None) -> list[ConversationEntry]:
        """The entries from the first up to `head_id`, oldest first, or only the last `limit`, in one query.

        Raises:
            KeyError: If `head_id` or an entry before it is missing.
        """
        if head_id is None or limit == 0:
            return []
        return await self._run(partial(_read_history, head_id=head_id, limit=limit))

    # --- A turn's log -------------------------------------------------------------------------------

    async def read_log(self, conversation_id: str) -> tuple[ConversationRecord | None, list[ConversationEntry]]:
        """The record and its whole history in one call on a pool thread; entries parsed before are not parsed again.

        Raises:
            LookupError: If a concurrent delete or rewrite released the history mid-read.
        """
        return await self._run(partial(_read_log, conversation_id=conversation_id, cache=self._entries))

    async def rewrite(self, conversation_id: str, plan: LogPlan[_T], *, attempts: int = 12) -> _T:
        """Read the log, plan and write, all in one `BEGIN IMMEDIATE` transaction on a pool thread: one hop.

        No other writer can come in between, so there is no revision conflict to retry; `attempts` is
        for the rare conflict the write itself still finds (a history released under it by another process).

        Raises:
            StoreError: If the database fails or does not answer in time, or the history is broken.
        """
        for _ in range(attempts):
            try:
                return await self._run(
                    partial(_rewrite, conversation_id=conversation_id, plan=plan, cache=self._entries)
                )
            except ConversationConflict:
                continue
        raise kept_changing(conversation_id, attempts)

    # --- Session events ---------------------------------------------------------------------------

    async def add_session_event(
        self,
        conversation_id: str,
        event_type: str,
        payload: dict[str, Any],
        *,
        session_id: str | None = None,
    ) -> None:
        """Keep a session webhook body with its conversation, stamped with the time it arrived."""
        row = (conversation_id, event_type, session_id, format_timestamp(datetime.now(UTC)), dump_payload(payload))
        await self._run(partial(_add_session_event, row=row))

    async def session_events(self, conversation_id: str) -> list[SessionEventRecord]:
        """The session events kept for a conversation, in the order they arrived."""
        return await self._run(partial(_session_events, conversation_id=conversation_id))

    async def _delete_unrecorded_extras(self, conversation_id: str) -> None:
        await self._run(partial(_delete_unrecorded_extras, conversation_id=conversation_id))

    # --- Markers ----------------------------------------------------------------------------------

    async def set_marker(
        self, conversation_id: str, name: str, value: str, *, ttl: float, only_if_absent: bool = False
    ) -> str | None:
        """Set a marker that expires `ttl` seconds from now; with `only_if_absent`, return the live value instead."""
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        return await self._run(
            partial(
                _set_marker,
                key=(conversation_id, name),
                value=value,
                ttl=ttl,
                only_if_absent=only_if_absent,
            )
        )

    async def _tombstone_and_revision(
        self, conversation_id: str, key: tuple[str, str]
    ) -> tuple[str | None, str | None]:
        """The live marker at `key` and the record's revision, in one call on the store's thread."""
        return await self._run(partial(_tombstone_and_revision, conversation_id=conversation_id, key=key))

    async def get_markers(self, keys: Sequence[tuple[str, str]]) -> list[str | None]:
        """The live values at `keys`, `None` where there is none, in one query."""
        if not keys:
            return []
        found = await self._run(partial(_get_markers, keys=list(keys)))
        return [found.get(key) for key in keys]

    async def replace_marker(self, conversation_id: str, name: str, expected: str, value: str, *, ttl: float) -> bool:
        """Set the marker to `value` if its live value is `expected`, in one write transaction."""
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        return await self._run(
            partial(_replace_marker, key=(conversation_id, name), expected=expected, value=value, ttl=ttl)
        )

    async def delete_marker(self, conversation_id: str, name: str) -> None:
        """Delete a marker if there is one."""
        await self._run(partial(_delete_marker, key=(conversation_id, name)))

    async def _marker_names(self, conversation_id: str) -> list[str]:
        return await self._run(partial(_marker_names, conversation_id=conversation_id))

    # --- Rate limits ------------------------------------------------------------------------------

    async def take_allowance(self, key: str, *, count: int, period: float) -> float:
        """Take one request from `key`'s allowance in one write transaction, so every process on the file shares it.

        The allowance is the marker `("", "rate:<key>")`, whose expiry is the GCRA theoretical arrival
        time: once that has passed the allowance is full again and the row is swept like any expired
        marker. The clock is this host's wall clock, which the processes sharing the file share.
        """
        interval = self._allowance_interval(count, period)
        return await self._run(partial(_take_allowance, name=f"rate:{key}", interval=interval, period=period))

    # --- Plumbing ---------------------------------------------------------------------------------

    async def _run(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `operation` with a connection on a pool thread, or raise `StoreUnavailableError` at the deadline."""
        if self._closed:
            raise StoreError(f"The store ({self.description}) is closed.")
        deadline = time.monotonic() + self._timeout
        try:
            # At the deadline a call not started yet never will be; one started commits or rolls back whole.
            return await self._pool.run(partial(self._in_worker, operation, deadline), self._timeout)
        except TimeoutError:
            raise self._late() from None

    def _in_worker(self, operation: Callable[[sqlite3.Connection], _T], deadline: float) -> _T:
        """On a pool thread: take an idle connection (or open one), run `operation` on it, give it back."""
        if time.monotonic() >= deadline:
            raise self._late()  # Its caller has given up already.
        _call.deadline, _call.write_lock, _call.late = deadline, self._write_lock, self._late
        try:
            with self._translate_errors():
                with self._pool_lock:
                    connection = self._idle.pop() if self._idle else None
                if connection is None:
                    connection = self._connect()
                try:
                    return operation(connection)
                finally:
                    self._give_back(connection)
        finally:
            _call.deadline, _call.write_lock, _call.late = None, None, None

    def _give_back(self, connection: sqlite3.Connection) -> None:
        with self._pool_lock:
            if not self._closed and not connection.in_transaction:
                self._idle.append(connection)
                return
        connection.close()  # The store closed meanwhile, or a failed ROLLBACK left the connection unusable.

    def _close_all(self, connections: list[sqlite3.Connection]) -> None:
        with self._translate_errors():
            for connection in connections:
                connection.close()

    def _open(self) -> sqlite3.Connection:
        with self._translate_errors():
            return self._connect()

    def _late(self) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"SQLite database {self._path} did not answer within {self._timeout:g} s (a stalled or overloaded disk?)."
        )

    @contextmanager
    def _translate_errors(self) -> Generator[None]:
        """Turn sqlite3 (and file system) errors into `StoreError`s that name the database."""
        try:
            yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if (code is not None and (code & 0xFF) in _BUSY_CODES) or "locked" in str(exc):
                raise StoreUnavailableError(
                    f"SQLite database {self._path} is locked: another connection held it for more than "
                    f"{self._busy_timeout_ms} ms ({exc})."
                ) from exc
            raise StoreError(f"SQLite database {self._path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"Cannot open SQLite database {self._path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        # Private from the start: a folder we create is 0700, the file 0600, and SQLite gives the `-wal`
        # and `-shm` files it creates later the database file's mode.
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass  # An existing database keeps its mode.
        # Autocommit (`isolation_level=None`): transactions are explicit, see `_transaction`. A
        # connection is used by one call at a time, on whichever pool thread runs it.
        connection = sqlite3.connect(
            self._path, timeout=self._busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise StoreError(f"SQLite database {self._path} cannot use WAL journaling (got {mode!r}).")
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute("PRAGMA foreign_keys = ON")
            _migrate(connection, self._path)
        except BaseException:
            connection.close()
            raise
        return connection


class _Pool:
    """Threads that run blocking calls and hand each outcome straight to the waiting coroutine's loop.

    What `ThreadPoolExecutor` plus `asyncio.wrap_future` and `wait_for` do, without their extra
    future (a `threading.Condition` each), the chaining between the two futures, and the waiter
    task and callbacks of `wait_for`: measured under the bench, that machinery was about a tenth of
    the event loop's time. Each call is one `SimpleQueue.put`, and one `call_soon_threadsafe` back.
    """

    def __init__(self, size: int, name: str) -> None:
        self._calls: queue.SimpleQueue[_PoolCall | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True) for index in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, call: Callable[[], _T], timeout: float) -> asyncio.Future[_T]:
        """`call()` on a pool thread; the future raises `TimeoutError` after `timeout` seconds.

        A call still queued when its future is done (timed out, or cancelled by its caller) never runs.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        timer = loop.call_later(timeout, _expire, future)
        self._calls.put(_PoolCall(call, loop, future, timer))
        return future

    def shutdown(self) -> None:
        """Let every thread end once the calls queued before are done."""
        for _ in self._threads:
            self._calls.put(None)

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            if item.future.done():
                continue  # Its caller gave up, or was cancelled, before it started.
            try:
                outcome: tuple[bool, object] = (True, item.call())
            except BaseException as exc:  # Handed to the caller, as the executor does.
                outcome = (False, exc)
            try:
                item.loop.call_soon_threadsafe(_settle, item.future, item.timer, outcome)
            except RuntimeError:
                pass  # The loop is closed: nobody waits any more.


@dataclass(frozen=True, slots=True)
class _PoolCall:
    call: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    timer: asyncio.TimerHandle


def _settle(future: asyncio.Future[Any], timer: asyncio.TimerHandle, outcome: tuple[bool, object]) -> None:
    timer.cancel()
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(cast(BaseException, value))


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


@contextmanager
def _transaction(connection: sqlite3.Connection) -> Generator[None]:
    """A write transaction that takes the write lock up front, committed on success and rolled back otherwise.

    In a store call (see `SQLiteStore._in_worker`) it first takes the store's own write lock, waiting no
    longer than the call's deadline, and rolls back rather than commit once that deadline has passed:
    its caller has been told it failed.
    """
    deadline: float | None = getattr(_call, "deadline", None)
    lock: threading.Lock | None = getattr(_call, "write_lock", None)
    late: Callable[[], StoreUnavailableError] | None = getattr(_call, "late", None)
    if lock is not None and not lock.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0)):
        raise late() if late is not None else StoreUnavailableError("The SQLite store's write lock was held too long.")
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
            if deadline is not None and late is not None and time.monotonic() >= deadline:
                raise late()
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:  # A failed COMMIT leaves the transaction open.
                connection.execute("ROLLBACK")
            raise
    finally:
        if lock is not None:
            lock.release()


def _ping(connection: sqlite3.Connection) -> None:
    """Rewrite the `("", "ready")` marker: a write that must reach the file (an empty transaction would not)."""
    with _transaction(connection):
        connection.execute(
            "INSERT INTO markers (conversation_id, name, value, expires_at) VALUES ('', 'ready', '', ?) "
            "ON CONFLICT (conversation_id, name) DO UPDATE SET expires_at = excluded.expires_at",
            (time.time() + 60,),
        )


def _retrieve(task: asyncio.Task[None]) -> None:
    """Take a finished ping's outcome, so one nobody awaits any more is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()


def _user_version(connection: sqlite3.Connection) -> int:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    return int(version)


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    """Apply the migrations the database lacks, all in one transaction, or refuse a newer database."""

    def check(version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"SQLite database {path} has schema version {version}, newer than the {SCHEMA_VERSION} "
                "this version of layercode-agent understands. Upgrade layercode-agent or use another file."
            )

    check(_user_version(connection))
    if _user_version(connection) == SCHEMA_VERSION:
        return
    with _transaction(connection):
        version = _user_version(connection)  # Again under the lock: another process may have migrated.
        check(version)
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


# --- Operations: each runs on the worker thread with its connection --------------------------------


def _read_record(connection: sqlite3.Connection, *, conversation_id: str) -> ConversationRecord | None:
    row = connection.execute("SELECT record FROM records WHERE conversation_id = ?", (conversation_id,)).fetchone()
    return None if row is None else load_record(row[0])


def _read_records(connection: sqlite3.Connection, *, scope: str | None, limit: int | None) -> list[ConversationRecord]:
    where = "" if scope is None else "WHERE scope = :scope"
    rows = connection.execute(
        f"SELECT record FROM records {where} ORDER BY updated_at DESC, rowid DESC LIMIT :limit",
        {"scope": scope, "limit": -1 if limit is None else limit},
    ).fetchall()
    return [load_record(text) for (text,) in rows]


_RecordRow = tuple[str, str, str | None, str | None, str, str, str]
_EntryRow = tuple[str, str | None, str, str, str]


def _record_row(record: ConversationRecord) -> _RecordRow:
    return (
        record.conversation_id,
        record.revision,
        record.head_id,
        record.scope,
        format_timestamp(record.updated_at),
        json.dumps(record.branches),
        dump_record(record),
    )


def _entry_rows(record: ConversationRecord, entries: Sequence[ConversationEntry]) -> list[_EntryRow]:
    conversation_id = record.conversation_id
    return [(entry.id, entry.parent_id, conversation_id, entry.kind, dump_message(entry.message)) for entry in entries]


def _write_record(
    connection: sqlite3.Connection,
    *,
    row: _RecordRow,
    entries: list[_EntryRow],
    expected_revision: str | None,
    released: list[str],
) -> None:
    with _transaction(connection):
        _write_rows(connection, row=row, entries=entries, expected_revision=expected_revision, released=released)


def _stored_revision(connection: sqlite3.Connection, conversation_id: str) -> str | None:
    stored = connection.execute("SELECT revision FROM records WHERE conversation_id = ?", (conversation_id,)).fetchone()
    return None if stored is None else str(stored[0])


def _write_rows(
    connection: sqlite3.Connection,
    *,
    row: _RecordRow,
    entries: list[_EntryRow],
    expected_revision: str | None,
    released: list[str],
) -> None:
    """Inside a write transaction: the revision check, the new entries, the record, the released entries."""
    conversation_id, _, head_id, *_ = row
    if _stored_revision(connection, conversation_id) != expected_revision:
        raise ConversationConflict(conversation_id)
    new_ids = {entry[0] for entry in entries}
    if (
        head_id is not None
        and head_id not in new_ids
        and connection.execute("SELECT 1 FROM entries WHERE id = ?", (head_id,)).fetchone() is None
    ):
        raise ConversationConflict(conversation_id)
    try:
        connection.executemany(
            "INSERT INTO entries (id, parent_id, conversation_id, kind, message) VALUES (?, ?, ?, ?, ?)", entries
        )
    except sqlite3.IntegrityError as exc:
        if "FOREIGN KEY" not in str(exc):
            raise
        # The entry the new ones follow was released by a concurrent delete, as with a missing head.
        raise ConversationConflict(conversation_id) from exc
    connection.execute(
        """
        INSERT INTO records (conversation_id, revision, head_id, scope, updated_at, branches, record)
        VALUES (?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (conversation_id) DO UPDATE SET
            revision = excluded.revision, head_id = excluded.head_id, scope = excluded.scope,
            updated_at = excluded.updated_at, branches = excluded.branches, record = excluded.record
        """,
        row,
    )
    # Newest first, so an entry's released child is gone before the entry is checked.
    for entry_id in reversed(released):
        connection.execute(_DELETE_IF_UNREFERENCED_SQL, {"id": entry_id})


def _read_log(
    connection: sqlite3.Connection, *, conversation_id: str, cache: EntryCache
) -> tuple[ConversationRecord | None, list[ConversationEntry]]:
    record = _read_record(connection, conversation_id=conversation_id)
    if record is None or record.head_id is None:
        return record, []
    return record, _read_history(connection, head_id=record.head_id, limit=None, cache=cache)


def _rewrite(connection: sqlite3.Connection, *, conversation_id: str, plan: LogPlan[_T], cache: EntryCache) -> _T:
    # Read and plan before taking the write lock (WAL readers wait for nobody), so another process's writes
    # wait only for this one's write; under the lock, the revision says whether anyone wrote in between,
    # and only then is the log read and planned again. A plan that writes nothing takes no lock at all.
    try:
        record, history = _read_log(connection, conversation_id=conversation_id, cache=cache)
    except KeyError:
        planned = None  # Released by a concurrent delete or rewrite mid-read: read again under the lock.
    else:
        planned = (record, *plan(record, history))
        if planned[2] is None:
            return planned[1]
    with _transaction(connection):
        if planned is not None:
            revision = planned[0].revision if planned[0] is not None else None
            if _stored_revision(connection, conversation_id) != revision:
                planned = None  # Someone wrote in between.
        if planned is None:
            try:
                record, history = _read_log(connection, conversation_id=conversation_id, cache=cache)
            except KeyError as exc:
                # Nobody can release entries inside this transaction: the chain was broken before it began.
                raise StoreError(
                    f"the history of conversation {conversation_id!r} is broken: entry {exc} is gone"
                ) from exc
            planned = (record, *plan(record, history))
        record, result, write = planned
        if write is not None:
            _write_log(connection, write, expected_revision=record.revision if record is not None else None)
        return result


def _write_log(connection: sqlite3.Connection, write: LogWrite, *, expected_revision: str | None) -> None:
    _write_rows(
        connection,
        row=_record_row(write.record),
        entries=_entry_rows(write.record, write.new_entries),
        expected_revision=expected_revision,
        released=list(write.released),
    )


def _delete_record(connection: sqlite3.Connection, *, conversation_id: str, expected_revision: str) -> None:
    with _transaction(connection):
        stored = connection.execute(
            "SELECT revision, head_id, branches FROM records WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()
        if stored is None or stored[0] != expected_revision:
            raise ConversationConflict(conversation_id)
        _, head_id, branches = stored
        # Its head, the branches it left, and any entry it wrote that a replacement left unreachable.
        written = [
            entry_id
            for (entry_id,) in connection.execute(
                "SELECT id FROM entries WHERE conversation_id = ? "
                "AND NOT EXISTS (SELECT 1 FROM entries AS child WHERE child.parent_id = entries.id)",
                (conversation_id,),
            )
        ]
        tips: list[str] = [*([head_id] if head_id is not None else []), *json.loads(branches), *written]
        connection.execute("DELETE FROM records WHERE conversation_id = ?", (conversation_id,))
        connection.execute("DELETE FROM session_events WHERE conversation_id = ?", (conversation_id,))
        connection.execute("DELETE FROM markers WHERE conversation_id = ?", (conversation_id,))
        connection.execute(_DELETE_UNREACHABLE_SQL, {"tips": json.dumps(tips)})


def _read_history(
    connection: sqlite3.Connection, *, head_id: str, limit: int | None, cache: EntryCache | None = None
) -> list[ConversationEntry]:
    # `-1` never equals a depth, so an unlimited walk stops only at the first entry.
    rows = connection.execute(_HISTORY_SQL, {"head_id": head_id, "limit": -1 if limit is None else limit}).fetchall()
    if not rows:
        raise KeyError(head_id)
    first_parent = rows[0][1]
    if first_parent is not None and (limit is None or len(rows) < limit):
        raise KeyError(first_parent)  # The chain is broken: an entry's parent is gone.
    history: list[ConversationEntry] = []
    for entry_id, parent_id, kind, message in rows:
        if kind != "message":
            raise StoreError(f"Entry {entry_id!r} has kind {kind!r}, which this version cannot read.")
        if cache is None:
            history.append(ConversationEntry(id=entry_id, parent_id=parent_id, message=load_message(message)))
        else:
            history.append(cache.entry(entry_id, parent_id, partial(load_message, message)))
    return history


def _add_session_event(connection: sqlite3.Connection, *, row: tuple[str, str, str | None, str, str]) -> None:
    connection.execute(
        "INSERT INTO session_events (conversation_id, event_type, session_id, received_at, payload) "
        "VALUES (?, ?, ?, ?, ?)",
        row,
    )


def _session_events(connection: sqlite3.Connection, *, conversation_id: str) -> list[SessionEventRecord]:
    rows = connection.execute(
        "SELECT event_type, session_id, received_at, payload FROM session_events WHERE conversation_id = ? ORDER BY id",
        (conversation_id,),
    ).fetchall()
    return [
        SessionEventRecord(
            event_type=event_type,
            session_id=session_id,
            received_at=parse_timestamp(received_at),
            payload=load_payload(payload),
        )
        for event_type, session_id, received_at, payload in rows
    ]


def _delete_unrecorded_extras(connection: sqlite3.Connection, *, conversation_id: str) -> None:
    with _transaction(connection):
        for table in ("session_events", "markers"):
            connection.execute(
                f"DELETE FROM {table} WHERE conversation_id = :id "
                "AND NOT EXISTS (SELECT 1 FROM records WHERE conversation_id = :id)",
                {"id": conversation_id},
            )


def _set_marker(
    connection: sqlite3.Connection, *, key: tuple[str, str], value: str, ttl: float, only_if_absent: bool
) -> str | None:
    now = time.time()
    with _transaction(connection):
        connection.execute("DELETE FROM markers WHERE expires_at <= ?", (now,))
        if only_if_absent:
            row = connection.execute("SELECT value FROM markers WHERE conversation_id = ? AND name = ?", key).fetchone()
            if row is not None:
                return str(row[0])
        connection.execute(
            "INSERT INTO markers (conversation_id, name, value, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (conversation_id, name) "
            "DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            (*key, value, now + ttl),
        )
    return None


def _tombstone_and_revision(
    connection: sqlite3.Connection, *, conversation_id: str, key: tuple[str, str]
) -> tuple[str | None, str | None]:
    return _get_markers(connection, keys=[key]).get(key), _stored_revision(connection, conversation_id)


def _get_markers(connection: sqlite3.Connection, *, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    now = time.time()
    for start in range(0, len(keys), 400):  # Within SQLite's limit on bound parameters.
        batch = keys[start : start + 400]
        rows = connection.execute(
            "SELECT conversation_id, name, value FROM markers WHERE expires_at > ? "
            f"AND (conversation_id, name) IN (VALUES {', '.join(['(?, ?)'] * len(batch))})",
            (now, *(part for key in batch for part in key)),
        )
        found.update({(conversation_id, name): value for conversation_id, name, value in rows})
    return found


def _replace_marker(
    connection: sqlite3.Connection, *, key: tuple[str, str], expected: str, value: str, ttl: float
) -> bool:
    with _transaction(connection):
        now = time.time()  # Under the write lock, as in `_take_allowance`.
        replaced = connection.execute(
            "UPDATE markers SET value = ?, expires_at = ? "
            "WHERE conversation_id = ? AND name = ? AND value = ? AND expires_at > ?",
            (value, now + ttl, *key, expected, now),
        )
        return replaced.rowcount == 1


def _delete_marker(connection: sqlite3.Connection, *, key: tuple[str, str]) -> None:
    connection.execute("DELETE FROM markers WHERE conversation_id = ? AND name = ?", key)


def _marker_names(connection: sqlite3.Connection, *, conversation_id: str) -> list[str]:
    rows = connection.execute("SELECT name FROM markers WHERE conversation_id = ?", (conversation_id,))
    return [name for (name,) in rows]


def _take_allowance(connection: sqlite3.Connection, *, name: str, interval: float, period: float) -> float:
    with _transaction(connection):
        # Read under the write lock: a wait for another process's transaction must not leave `now` stale.
        now = time.time()
        connection.execute("DELETE FROM markers WHERE expires_at <= ?", (now,))
        row = connection.execute("SELECT expires_at FROM markers WHERE conversation_id = '' AND name = ?", (name,))
        stored = row.fetchone()
        tat = max(float(stored[0]), now) if stored is not None else now
        allow_at = tat + interval - period
        if now < allow_at:
            return allow_at - now  # Refused: the allowance is left as it was (the sweep still commits).
        connection.execute(
            "INSERT INTO markers (conversation_id, name, value, expires_at) VALUES ('', ?, '', ?) "
            "ON CONFLICT (conversation_id, name) DO UPDATE SET expires_at = excluded.expires_at",
            (name, tat + interval),
        )
    return 0.0
