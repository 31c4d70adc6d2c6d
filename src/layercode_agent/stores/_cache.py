"""The entries a store has parsed once, so a turn's log is not parsed again on every read.

An entry never changes once written: replacing a conversation's newest messages writes new entries
and releases the old ones. So an entry read from the database (its id, its parent and its message) is
the same every time, and parsing its JSON again is wasted work; measured on a turn's path, it was most
of a history read, and it grows with the conversation (about 10 to 15 µs a message, read twice a turn).
A cache hit still needs the database to return the row, so a deleted or released entry is never served.

The objects are shared by every reader that gets them: see `AgentStore.read_log`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from pydantic_ai.conversation_store import ConversationEntry
from pydantic_ai.messages import ModelMessage

__all__ = ["ENTRY_CACHE_SIZE", "EntryCache"]

ENTRY_CACHE_SIZE: Final = 8192
"""Entries kept per store: the logs of the conversations in flight (a few dozen messages each), least recently
read first out."""


class EntryCache:
    """Parsed entries by id, least recently used first out; safe to use from several threads."""

    def __init__(self, size: int = ENTRY_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[str, ConversationEntry] = OrderedDict()
        self._lock = threading.Lock()

    def entry(self, entry_id: str, parent_id: str | None, message: Callable[[], ModelMessage]) -> ConversationEntry:
        """The entry `entry_id`, parsed (`message()`) only if it is not kept yet."""
        entries = self._entries
        with self._lock:
            cached = entries.get(entry_id)
            if cached is not None:
                entries.move_to_end(entry_id)
                return cached
        entry = ConversationEntry(id=entry_id, parent_id=parent_id, message=message())
        with self._lock:
            entries[entry_id] = entry
            if len(entries) > self._size:
                entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)
