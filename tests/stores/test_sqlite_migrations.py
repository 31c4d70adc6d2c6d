"""Upgrading a database written at an older schema version keeps everything in it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pydantic_ai.conversation import Conversation
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart

from layercode_agent.stores import SQLiteStore
from layercode_agent.stores.sqlite import SCHEMA_VERSION

pytestmark = pytest.mark.anyio


def tables(path: Path) -> set[str]:
    connection = sqlite3.connect(path)
    try:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        connection.close()


def user_version(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        return int(connection.execute("PRAGMA user_version").fetchone()[0])
    finally:
        connection.close()


async def test_a_version_1_database_is_migrated_in_place_and_keeps_its_conversations(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    messages = [ModelRequest.user_text_prompt("hello"), ModelResponse(parts=[TextPart("hi there")])]
    async with SQLiteStore(path) as store:
        await store.save(Conversation(conversation_id="old", messages=messages))
        await store.add_session_event("old", "session.end", {"transcript": []})
    # Take it back to what schema version 1 was: no markers table.
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("DROP TABLE markers")
    connection.execute("PRAGMA user_version = 1")
    connection.close()
    assert "markers" not in tables(path)

    async with SQLiteStore(path) as store:
        loaded = await store.load("old")
        events = await store.session_events("old")
        claimed = await store.set_marker("old", "claim", "1", ttl=30, only_if_absent=True)
        markers = await store.get_markers([("old", "claim")])

    assert SCHEMA_VERSION == 2
    assert user_version(path) == SCHEMA_VERSION
    assert "markers" in tables(path)
    assert loaded is not None and loaded.messages == messages
    assert [event.event_type for event in events] == ["session.end"]
    assert claimed is None and markers == ["1"]
