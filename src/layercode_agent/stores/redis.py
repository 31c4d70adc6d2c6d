"""A `ConversationStore` in Redis: every worker on every host shares conversations, optionally with a retention.

Why it is shaped like this (the key layout is drawn in `_redis_scripts`):

- **Messages are stored once, as entry hashes shared between conversations.** A fork points into its
  source's entries instead of copying them, so `read_entry` finds any entry by id alone. Each
  conversation keeps a set of the entries it *holds*: those it wrote and every one its head and
  branches reach. Each entry names its holders, so deleting a conversation knows, without walking
  anyone's history, which entries no other conversation still holds.
- **Every write is one Lua script**: the revision check, the check that the head and each new entry's
  parent exist, the entries, the record, the indexes, the released entries' deletion and the
  retention refresh. Redis runs a script with nothing in between, and the scripts check everything
  before their first write, so a conflict or a failed write leaves nothing behind, and a caller
  cancelled mid-save leaves the script to run whole or not at all. Reads of a whole history, a page
  of records or a batch of markers are one round trip each.
- **Retention** (`ttl`, in seconds) is Redis expiry: each write to a conversation sets every key of it
  (record, the entries it holds, session events, the indexes listing it) to expire `ttl` from now, so
  a conversation goes `ttl` after its last write. An entry a fork shares lives as long as its longest
  lived holder. Listings skip (and prune) conversations that expired. Markers keep their own expiry.
  Every process sharing a prefix must use the same retention.
- **Driver errors are translated at one boundary** (`_translate_errors`): a refused, dropped or timed
  out connection is `StoreUnavailableError`, anything else `StoreError`, and neither ever shows the
  password. A dropped connection is retried once on a fresh one (a write retried after a lost reply
  is recognised by its revision and not applied twice).

Deleting a conversation removes its record, its session events, its markers and every entry no
remaining conversation holds, including replaced ones it wrote. Entries a fork still reaches stay for
the fork and go when the last conversation holding them is deleted (or expires).

Needs Redis 7.0 or later (or a compatible server such as Valkey), and a single server or primary:
the scripts touch keys they compute, which Redis Cluster does not allow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Generator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.exceptions as redis_errors
from pydantic_ai.conversation_store import ConversationConflict, ConversationEntry, ConversationRecord
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..redact import redact_text
from . import _redis_scripts as scripts
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
from .base import AgentStore, SessionEventRecord, StoreError, StoreUnavailableError

__all__ = ["DEFAULT_PREFIX", "RedisStore"]

DEFAULT_PREFIX = "layercode-agent:"
"""The key prefix when the URL names none."""

_DEFAULT_TIMEOUTS = {"socket_connect_timeout": 5.0, "socket_timeout": 5.0}
"""Seconds to wait for a connection and for a reply, unless the URL's query says otherwise."""

_OWN_OPTIONS = frozenset({"prefix", "ttl"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)


class RedisStore(AgentStore):
    """Conversations, their messages, session events and markers in Redis, shared by every worker that uses it.

    Any number of processes may use the same Redis and prefix: a save that lost a race raises
    `ConversationConflict`, never overwrites. Nothing connects until the first operation. Call
    `aclose()` (or use `async with`) when done.
    """

    def __init__(
        self, url: str, *, prefix: str | None = None, ttl: float | None = None, timeout: float | None = None
    ) -> None:
        """Configure a store for `redis://[[user]:password@]host[:port][/db][?prefix=...&ttl=seconds]`.

        `rediss://` connects over TLS. Other query parameters (`socket_timeout=2`, `ssl_ca_certs=...`)
        go to redis-py; the connect and reply timeouts default to 5 seconds.

        Args:
            url: The Redis URL.
            prefix: The key prefix, instead of the URL's `prefix` (default `"layercode-agent:"`).
            ttl: Seconds a conversation is kept after its last write, instead of the URL's `ttl`
                (default: until it is deleted).
            timeout: Seconds for the connect and reply timeouts, unless the URL's query sets them (default 5).

        Raises:
            StoreError: If the URL or an option is malformed; the message never repeats a password.
        """
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # Such as an unclosed `[` around an IPv6 host; the message quotes no URL.
            raise StoreError(f"The Redis store URL is malformed: {exc}.") from exc
        if parts.scheme not in {"redis", "rediss"}:
            raise StoreError(f"Redis store URLs start with redis:// or rediss:// (got {parts.scheme!r}).")
        # Kept only to scrub it from error messages; redis-py also accepts it as `?password=`.
        self._secrets = [unquote(parts.password)] if parts.password else []
        try:
            port = parts.port or 6379
        except ValueError as exc:
            raise StoreError("The Redis store URL's port is not a number.") from exc
        self._host = parts.hostname or "localhost"
        self._port = port
        self._tls = parts.scheme == "rediss"

        ours: dict[str, str] = {}
        theirs: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in _OWN_OPTIONS:
                if name in ours:
                    raise StoreError(f"The Redis store URL gives {name!r} more than once.")
                ours[name] = value
            elif name == "decode_responses":
                raise StoreError("The Redis store URL cannot set decode_responses; the store decodes replies itself.")
            else:
                theirs.append((name, value))
        self._secrets += [value for name, value in theirs if name == "password" and value]
        self._db = _database(parts.path, dict(theirs).get("db"))
        self._prefix = prefix if prefix is not None else ours.get("prefix", DEFAULT_PREFIX)
        if not self._prefix:
            raise StoreError("The Redis key prefix must not be empty; keep the default or name one, e.g. ?prefix=app:.")
        self._ttl = ttl if ttl is not None else _parse_ttl(ours["ttl"]) if "ttl" in ours else None
        if self._ttl is not None and not (math.isfinite(self._ttl) and self._ttl > 0):
            raise StoreError(f"The Redis retention (ttl) must be a positive number of seconds (got {self._ttl!r}).")

        client_url = urlunsplit(parts._replace(query=urlencode(theirs)))
        options: dict[str, Any] = {
            **_DEFAULT_TIMEOUTS,
            **({} if timeout is None else dict.fromkeys(_DEFAULT_TIMEOUTS, timeout)),
            "decode_responses": True,
            # One immediate retry on a fresh connection: pooled ones die when Redis restarts or an idle
            # connection is cut. Not on timeouts, which would only double the wait.
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
        }
        try:
            self._client = Redis.from_url(client_url, **options)
            # Connections are made lazily; making one (unconnected) now rejects unknown query options.
            self._client.connection_pool.make_connection()
        except (TypeError, ValueError) as exc:
            raise StoreError(
                f"The Redis store URL has an option redis-py does not accept: {self._redact(exc)}"
            ) from exc
        self._closed = False
        self._write = self._client.register_script(scripts.WRITE_RECORD)
        self._delete = self._client.register_script(scripts.DELETE_RECORD)
        self._delete_extras = self._client.register_script(scripts.DELETE_UNRECORDED_EXTRAS)
        self._add_event = self._client.register_script(scripts.ADD_SESSION_EVENT)
        self._set_marker = self._client.register_script(scripts.SET_MARKER)
        self._replace_marker = self._client.register_script(scripts.REPLACE_MARKER)
        self._take_allowance = self._client.register_script(scripts.TAKE_ALLOWANCE)
        self._read_history = self._client.register_script(scripts.READ_HISTORY)
        self._read_log = self._client.register_script(scripts.READ_LOG)
        self._entries = EntryCache()
        """The entries `read_log` parsed, for the next turn's read (see `_cache`)."""
        self._read_records = self._client.register_script(scripts.READ_RECORDS)

    @property
    def prefix(self) -> str:
        """The prefix of every key the store writes."""
        return self._prefix

    @property
    def ttl(self) -> float | None:
        """Seconds a conversation is kept after its last write, or `None` to keep it until deleted."""
        return self._ttl

    @property
    def description(self) -> str:
        """Human text for the start-up banner; never the password."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        retention = f"retention {_duration(self._ttl)}" if self._ttl is not None else "kept until deleted"
        tls = " over TLS" if self._tls else ""
        return f"Redis{tls} at {host}:{self._port}/{self._db} (prefix {self._prefix!r}, {retention})"

    async def aclose(self) -> None:
        """Close the connections. Safe to call twice."""
        if self._closed:
            return
        with self._translate_errors():
            await self._client.aclose()
        self._closed = True

    # --- ConversationStore primitives -------------------------------------------------------------

    async def read_record(self, conversation_id: str) -> ConversationRecord | None:
        """The record for a conversation, or `None` if the store doesn't have it (or it expired)."""
        with self._translate_errors():
            text = await cast(
                "Awaitable[str | None]", self._client.hget(self._conversation_key(conversation_id, "record"), "record")
            )
        return None if text is None else load_record(text)

    async def read_records(self, *, scope: str | None = None, limit: int | None = None) -> Sequence[ConversationRecord]:
        """The stored records, or those with `scope`, most recently saved first, at most `limit` of them."""
        if limit == 0:
            return []
        index = self._key("index") if scope is None else self._key(f"index:{scope}")
        args = [self._prefix, "0" if scope is None else "1", scope or "", -1 if limit is None else limit]
        with self._translate_errors():
            texts = cast(list[str], await self._read_records(keys=[index], args=args))
        return [load_record(text) for text in texts]

    async def write_record(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
    ) -> None:
        """Store the record and its new entries in one script, or raise `ConversationConflict` and store nothing."""
        await self.write_record_replacing(record, new_entries=new_entries, expected_revision=expected_revision)

    async def write_record_replacing(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
        released: Sequence[str] = (),
    ) -> None:
        """`write_record`, also deleting the `released` entries nothing else holds or reaches, in the same script."""
        conversation_id = record.conversation_id
        header = {
            "conversation_id": conversation_id,
            "expected": expected_revision,
            "revision": record.revision,
            "head": record.head_id,
            "branches": list(record.branches),
            "scope": record.scope,
            "updated": str(_microseconds(record.updated_at)),
            "entries": [[entry.id, entry.parent_id, entry.kind] for entry in new_entries],
            "released": list(released),
            "ttl": None if self._ttl is None else str(self._ttl_ms(self._ttl)),
        }
        keys = [
            self._conversation_key(conversation_id, "record"),
            self._conversation_key(conversation_id, "entries"),
            self._key("index"),
        ]
        # UTF-8 as is (`ensure_ascii=False`): the script builds keys from these ids, as Python does.
        header_json = json.dumps(header, ensure_ascii=False)
        args = [self._prefix, header_json, dump_record(record), *(dump_message(e.message) for e in new_entries)]
        with self._translate_errors():
            outcome = await self._write(keys=keys, args=args)
        if outcome == "conflict":
            raise ConversationConflict(conversation_id)

    async def delete_record(self, conversation_id: str, *, expected_revision: str) -> None:
        """Delete the record, its session events and markers, and the entries no other conversation holds."""
        keys = [
            *(self._conversation_key(conversation_id, part) for part in ("record", "entries", "events", "markers")),
        ]
        args = [self._prefix, conversation_id, expected_revision, self._marker_key(conversation_id, "")]
        with self._translate_errors():
            outcome = await self._delete(keys=keys, args=args)
        if outcome == "conflict":
            raise ConversationConflict(conversation_id)

    async def read_entry(self, entry_id: str) -> ConversationEntry:
        """The entry with this id, whichever conversation wrote it.

        Raises:
            KeyError: If it isn't stored.
        """
        with self._translate_errors():
            fields = await cast(
                "Awaitable[list[str | None]]",
                self._client.hmget(self._key(f"entry:{entry_id}"), ["kind", "message", "parent"]),
            )
        kind, message, parent_id = fields
        if message is None:
            raise KeyError(entry_id)
        return _entry(entry_id, parent_id, kind, message)

    async def read_history(self, head_id: str | None, *, limit: int | None = None) -> list[ConversationEntry]:
        """The entries from the first up to `head_id`, oldest first, or only the last `limit`, in one round trip.

        Raises:
            KeyError: If `head_id` or an entry before it is missing.
        """
        if head_id is None or limit == 0:
            return []
        with self._translate_errors():
            reply = await self._read_history(args=[self._prefix, head_id, -1 if limit is None else limit])
        status, payload = cast(tuple[str, Any], reply)
        if status == "missing":
            raise KeyError(cast(str, payload))
        rows = cast(list[list[str]], payload)
        return [_entry(row[0], row[3] if len(row) > 3 else None, row[1], row[2]) for row in reversed(rows)]

    # --- A turn's log -------------------------------------------------------------------------------

    async def read_log(self, conversation_id: str) -> tuple[ConversationRecord | None, list[ConversationEntry]]:
        """The record and its whole history in one round trip; entries parsed before are not parsed again.

        Raises:
            LookupError: If a concurrent delete or rewrite released the history mid-read.
        """
        with self._translate_errors():
            reply = cast(list[Any], await self._read_log(args=[self._prefix, conversation_id]))
        if reply[0] == "none":
            return None, []
        if reply[0] == "missing":
            raise KeyError(cast(str, reply[1]))
        record = load_record(cast(str, reply[1]))
        cache = self._entries
        history: list[ConversationEntry] = []
        for row in reversed(cast(list[list[str]], reply[2])):
            entry_id, message = row[0], row[2]
            _check_kind(entry_id, row[1])
            history.append(cache.entry(entry_id, row[3] if len(row) > 3 else None, partial(load_message, message)))
        return record, history

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
        item = json.dumps([event_type, session_id, format_timestamp(datetime.now(UTC)), dump_payload(payload)])
        ttl = "" if self._ttl is None else str(self._ttl_ms(self._ttl))
        keys = [self._conversation_key(conversation_id, "events")]
        with self._translate_errors():
            await self._add_event(keys=keys, args=[self._prefix, conversation_id, item, ttl])

    async def session_events(self, conversation_id: str) -> list[SessionEventRecord]:
        """The session events kept for a conversation, in the order they arrived."""
        with self._translate_errors():
            items = await cast(
                "Awaitable[list[str]]", self._client.lrange(self._conversation_key(conversation_id, "events"), 0, -1)
            )
        events: list[SessionEventRecord] = []
        for item in items:
            event_type, session_id, received_at, payload = json.loads(item)
            events.append(
                SessionEventRecord(
                    event_type=event_type,
                    session_id=session_id,
                    received_at=parse_timestamp(received_at),
                    payload=load_payload(payload),
                )
            )
        return events

    async def _delete_unrecorded_extras(self, conversation_id: str) -> None:
        keys = [self._conversation_key(conversation_id, part) for part in ("record", "events", "markers")]
        with self._translate_errors():
            await self._delete_extras(keys=keys, args=[self._prefix, self._marker_key(conversation_id, "")])

    # --- Markers ----------------------------------------------------------------------------------

    async def set_marker(
        self, conversation_id: str, name: str, value: str, *, ttl: float, only_if_absent: bool = False
    ) -> str | None:
        """Set a marker that Redis expires `ttl` seconds from now; with `only_if_absent`, return the live value."""
        if not ttl > 0:
            raise ValueError("ttl must be positive")
        keys = [self._marker_key(conversation_id, name), self._conversation_key(conversation_id, "markers")]
        args = [value, self._ttl_ms(ttl), "1" if only_if_absent else "0", name]
        with self._translate_errors():
            current = await self._set_marker(keys=keys, args=args)
        return cast(str | None, current)

    async def _tombstone_and_revision(
        self, conversation_id: str, key: tuple[str, str]
    ) -> tuple[str | None, str | None]:
        """The live marker at `key` and the record's revision, in one round trip (a pipeline of GET and HGET)."""
        with self._translate_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self._marker_key(*key))
                pipe.hget(self._conversation_key(conversation_id, "record"), "revision")
                tombstone, revision = await pipe.execute()
        return cast(str | None, tombstone), cast(str | None, revision)

    async def get_markers(self, keys: Sequence[tuple[str, str]]) -> list[str | None]:
        """The live values at `keys`, `None` where there is none, with one MGET."""
        if not keys:
            return []
        with self._translate_errors():
            values = await cast(
                "Awaitable[list[str | None]]",
                self._client.mget([self._marker_key(conversation_id, name) for conversation_id, name in keys]),
            )
        return values

    async def replace_marker(self, conversation_id: str, name: str, expected: str, value: str, *, ttl: float) -> bool:
        """Set the marker to `value` if it still holds `expected`, in one script."""
        if not ttl > 0:
            raise ValueError("ttl must be positive")
        keys = [self._marker_key(conversation_id, name), self._conversation_key(conversation_id, "markers")]
        with self._translate_errors():
            replaced = await self._replace_marker(keys=keys, args=[expected, value, self._ttl_ms(ttl), name])
        return replaced == 1

    async def delete_marker(self, conversation_id: str, name: str) -> None:
        """Delete a marker if there is one."""
        with self._translate_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._marker_key(conversation_id, name))
                pipe.zrem(self._conversation_key(conversation_id, "markers"), name)
                await pipe.execute()

    async def _marker_names(self, conversation_id: str) -> list[str]:
        index = self._conversation_key(conversation_id, "markers")
        with self._translate_errors():
            return await cast("Awaitable[list[str]]", self._client.zrange(index, 0, -1))

    # --- Rate limits ------------------------------------------------------------------------------

    async def take_allowance(self, key: str, *, count: int, period: float) -> float:
        """Take one request from `key`'s allowance in one script on the Redis clock, shared by every server.

        The allowance is the key `<prefix>rate:<key>`, which Redis expires once it is full again. A
        request whose reply a dropped connection lost is retried like any other, so it may count twice:
        the error is on the side of refusing.
        """
        interval = self._allowance_interval(count, period)
        # Microseconds, the resolution of Redis's TIME; `repr` keeps the floats exact.
        args = [repr(interval * 1_000_000), repr(period * 1_000_000)]
        with self._translate_errors():
            wait = await self._take_allowance(keys=[self._key(f"rate:{key}")], args=args)
        return int(cast(int, wait)) / 1_000_000

    # --- Plumbing ---------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def _conversation_key(self, conversation_id: str, part: str) -> str:
        return f"{self._prefix}conversation:{conversation_id}:{part}"

    def _marker_key(self, conversation_id: str, name: str) -> str:
        # Length-prefixed: both parts may contain any character, `:` included.
        return f"{self._prefix}marker:{len(conversation_id)}:{conversation_id}:{name}"

    @staticmethod
    def _ttl_ms(seconds: float) -> int:
        return max(1, math.ceil(seconds * 1000))

    def _redact(self, error: object) -> str:
        return redact_text(str(error), self._secrets)

    @contextmanager
    def _translate_errors(self) -> Generator[None]:
        """Turn redis-py errors into `StoreError`s that name the server, never the password."""
        where = f"Redis at {self._host}:{self._port}/{self._db}"
        if self._closed:
            raise StoreError(f"The store ({where}) is closed.")
        try:
            yield
        except (
            redis_errors.AuthenticationError,
            redis_errors.AuthorizationError,
            redis_errors.NoPermissionError,
        ) as exc:
            raise StoreError(f"{where} refused the credentials in the store URL: {self._redact(exc)}") from exc
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            raise StoreUnavailableError(f"{where} is unreachable: {self._redact(exc)}") from exc
        except (redis_errors.OutOfMemoryError, redis_errors.ReadOnlyError, redis_errors.TryAgainError) as exc:
            raise StoreUnavailableError(f"{where} cannot take writes right now: {self._redact(exc)}") from exc
        except redis_errors.RedisError as exc:
            if str(exc).startswith(("BUSY", "LOADING", "MASTERDOWN")):
                raise StoreUnavailableError(f"{where} is busy: {self._redact(exc)}") from exc
            if "near '#'" in str(exc):  # Redis 6 reading the `#!lua` line the scripts start with.
                raise StoreError(f"{where} is older than Redis 7.0, which the store needs.") from exc
            raise StoreError(f"{where}: {self._redact(exc)}") from exc


def _entry(entry_id: str, parent_id: str | None, kind: str | None, message: str) -> ConversationEntry:
    _check_kind(entry_id, kind)
    return ConversationEntry(id=entry_id, parent_id=parent_id, message=load_message(message))


def _check_kind(entry_id: str, kind: str | None) -> None:
    if kind != "message":
        raise StoreError(f"Entry {entry_id!r} has kind {kind!r}, which this version cannot read.")


def _microseconds(moment: datetime) -> int:
    """`moment` as whole microseconds since the Unix epoch; a naive datetime is taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _ONE_MICROSECOND


def _database(path: str, query_db: str | None) -> int:
    """The database number: the URL's `db` query parameter, else its path (`/0`), else 0."""
    text = query_db if query_db is not None else path.strip("/") or "0"
    if not text.isdigit():
        raise StoreError(f"The Redis database must be a number such as /0 (got {text!r}).")
    return int(text)


def _parse_ttl(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise StoreError(f"The Redis retention (ttl) must be a number of seconds (got {text!r}).") from None


def _duration(seconds: float) -> str:
    """`604800` as `"7 days"`, `90` as `"90 seconds"`."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds:g} second{'' if seconds == 1 else 's'}"
