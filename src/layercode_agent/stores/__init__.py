"""Where conversations live between turns: backends of pydantic-ai's `ConversationStore`, chosen by URL.

A URL keeps the choice to one setting (`memory://`, `sqlite:///data/conversations.db`,
`redis://localhost:6379/0?ttl=604800`) that the composition root passes to `open_store`; the rest of
the app only sees an `AgentStore`.
"""

from __future__ import annotations

from ..redact import redact_url
from .base import (
    TOMBSTONE_TTL,
    AgentStore,
    DeliveryCheck,
    LogPlan,
    LogWrite,
    SessionEventRecord,
    StoreError,
    StoreUnavailableError,
)
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import DEFAULT_TIMEOUT, SQLiteStore

__all__ = [
    "TOMBSTONE_TTL",
    "AgentStore",
    "DeliveryCheck",
    "LogPlan",
    "LogWrite",
    "MemoryStore",
    "RedisStore",
    "SQLiteStore",
    "SessionEventRecord",
    "StoreError",
    "StoreUnavailableError",
    "open_store",
]

_ACCEPTED = (
    "memory://, sqlite:///relative/path.db, sqlite:////absolute/path.db "
    "or redis://[[user]:password@]host[:port][/db][?prefix=...&ttl=seconds] (rediss:// for TLS)"
)


def open_store(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> AgentStore:
    """Open the store a URL names.

    - `memory://`: a `MemoryStore`, for one process that may forget everything on restart.
    - `sqlite:///data/conversations.db`: a `SQLiteStore` at a path relative to the working directory;
      `sqlite:////var/lib/agent/conversations.db` (four slashes) for an absolute path, as in SQLAlchemy.
    - `redis://[[user]:password@]host[:port][/db]` (`rediss://` for TLS): a `RedisStore`, shared by workers
      on any host. `?prefix=` sets the key prefix (default `layercode-agent:`), `?ttl=` the seconds a
      conversation is kept after its last write (default: until deleted); other query parameters go
      to redis-py (`socket_timeout=2`).

    Args:
        url: The store URL.
        timeout: Seconds a store call may take before `StoreUnavailableError` (`STORE_TIMEOUT`): a SQLite
            call as a whole; Redis's connect and reply timeouts, unless the URL's query sets them.

    Raises:
        StoreError: If the URL is malformed, its scheme unsupported, or the database cannot be opened.
            Nothing in the message repeats a password from the URL (`redact_url` hides it).
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise StoreError(f"Store URL {redact_url(url)!r} has no scheme; use {_ACCEPTED}.")
    if scheme == "memory":
        if rest:
            raise StoreError(f"memory:// takes no path (got {redact_url(url)!r}).")
        return MemoryStore()
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else ""
        if not path or "?" in path:
            raise StoreError(
                "SQLite store URLs look like sqlite:///relative/path.db or sqlite:////absolute/path.db "
                f"(got {redact_url(url)!r})."
            )
        return SQLiteStore(path, timeout=timeout)
    if scheme in {"redis", "rediss"}:
        # RedisStore never echoes the URL: it may carry a password.
        return RedisStore(url, timeout=timeout)
    # Only the scheme is echoed, in case the rest carries credentials.
    raise StoreError(f"Unsupported store URL scheme {scheme!r}; use {_ACCEPTED}.")
