"""Stored messages read back as turns, against the real memory and SQLite stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic_ai.conversation import Conversation
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.usage import RunUsage

from layercode_agent.conversations import (
    PREVIEW_CHARS,
    ConversationDetail,
    delete_conversation,
    get_conversation,
    group_turns,
    list_conversations,
)
from layercode_agent.stores import AgentStore, MemoryStore, SQLiteStore

pytestmark = pytest.mark.anyio

STARTED = datetime(2025, 10, 14, 9, 12, 0, tzinfo=UTC)
REPLIED = datetime(2025, 10, 14, 9, 12, 3, tzinfo=UTC)


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AgentStore]:
    backend: AgentStore = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "c.db")
    async with backend:
        yield backend


def meta(turn_id: str, role: str, status: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"turn_id": turn_id, "role": role, **({"status": status} if status else {}), **extra}


def user(turn_id: str, text: str) -> ModelRequest:
    return ModelRequest(
        parts=[UserPromptPart(text, timestamp=STARTED)], metadata=meta(turn_id, "user", delivery="ab" * 32)
    )


def reply(turn_id: str, text: str, status: str, **extra: Any) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart(text)], timestamp=REPLIED, metadata=meta(turn_id, "assistant", status, **extra)
    )


def sample_messages() -> list[ModelMessage]:
    """One conversation with every kind of turn the turn runner records."""
    return [
        reply("turn_0", "Welcome aboard.", "completed", kind="welcome"),
        user("turn_1", "What's the weather in Paris?"),
        ModelResponse(
            parts=[ToolCallPart("get_weather", {"city": "Paris"}, tool_call_id="call_1")],
            metadata=meta("turn_1", "tool"),
        ),
        ModelRequest(
            parts=[ToolReturnPart("get_weather", "sunny, 21 C", tool_call_id="call_1")],
            metadata=meta("turn_1", "tool"),
        ),
        reply("turn_1", "It is sunny in Paris.", "completed"),
        user("turn_2", "Tell me a long story."),
        reply(
            "turn_2",
            "Once upon a time",
            "interrupted",
            text_sent="Once upon a time, in a land far away,",
            text_heard="Once upon a time",
        ),
        user("turn_3", "What time is it?"),
        reply("turn_3", "Sorry, I could not answer that.", "failed"),
        user("turn_4", "Are you [still] there?"),
        ModelResponse(
            parts=[],
            metadata=meta("turn_4", "assistant", "pending", owner="worker-1", started_at=STARTED.isoformat()),
        ),
    ]


async def save(store: AgentStore, conversation_id: str, messages: list[ModelMessage], **kwargs: Any) -> None:
    await store.save(Conversation(conversation_id=conversation_id, messages=messages, **kwargs))


async def test_turns_are_grouped_with_their_statuses(store: AgentStore) -> None:
    await save(store, "conv_1", sample_messages())
    detail = await get_conversation(store, "conv_1")
    assert detail is not None
    turns = detail.turns
    assert [(t.turn_id, t.kind, t.status) for t in turns] == [
        ("turn_0", "welcome", "completed"),
        ("turn_1", "message", "completed"),
        ("turn_2", "message", "interrupted"),
        ("turn_3", "message", "failed"),
        ("turn_4", "message", "pending"),
    ]
    welcome, weather, story, failed, pending = turns
    assert welcome.user_text is None and welcome.reply_text == "Welcome aboard."
    assert weather.user_text == "What's the weather in Paris?"
    assert weather.reply_text == "It is sunny in Paris."
    assert [(tool.tool_name, tool.args, tool.result, tool.outcome) for tool in weather.tools] == [
        ("get_weather", '{"city":"Paris"}', "sunny, 21 C", "success")
    ]
    assert weather.started_at == STARTED and weather.ended_at == REPLIED
    assert story.reply_text == "Once upon a time"
    assert story.text_heard == "Once upon a time"
    assert story.text_sent == "Once upon a time, in a land far away,"
    assert failed.reply_text == "Sorry, I could not answer that." and failed.text_sent is None
    assert pending.reply_text == "" and pending.ended_at is None
    assert pending.user_text == "Are you [still] there?"
    assert detail.turn_count == 5
    assert detail.last_status == "pending"
    assert detail.last_user_text == "Are you [still] there?"
    assert detail.updated_at is not None


async def test_a_placeholder_followed_by_its_reply_shows_the_reply(store: AgentStore) -> None:
    placeholder = ModelResponse(parts=[], metadata=meta("t1", "assistant", "pending", started_at="not a time"))
    await save(store, "conv", [user("t1", "Hi"), placeholder, reply("t1", "Hello!", "completed")])
    detail = await get_conversation(store, "conv")
    assert detail is not None
    [turn] = detail.turns
    assert (turn.status, turn.reply_text, turn.ended_at) == ("completed", "Hello!", REPLIED)


async def test_a_reply_saved_after_the_callers_next_words_joins_its_own_turn(store: AgentStore) -> None:
    # A barged-in reply is saved in the background, after the caller's next message.
    messages: list[ModelMessage] = [
        user("t1", "Tell me a story."),
        user("t2", "Actually, stop."),
        reply("t1", "Once", "interrupted"),
        reply("t2", "Okay.", "completed"),
    ]
    await save(store, "conv", messages)
    detail = await get_conversation(store, "conv")
    assert detail is not None
    assert [(t.turn_id, t.user_text, t.reply_text, t.status) for t in detail.turns] == [
        ("t1", "Tell me a story.", "Once", "interrupted"),
        ("t2", "Actually, stop.", "Okay.", "completed"),
    ]


async def test_legacy_messages_without_metadata_get_roles_from_their_parts(store: AgentStore) -> None:
    messages: list[ModelMessage] = [
        ModelResponse(parts=[TextPart("Hi, I'm the assistant.")]),
        ModelRequest(parts=[UserPromptPart("Weather?")]),
        ModelResponse(parts=[TextPart("Checking."), ToolCallPart("get_weather", {"city": "Oslo"}, tool_call_id="c")]),
        ModelRequest(parts=[ToolReturnPart("get_weather", {"sky": "grey"}, tool_call_id="c")]),
        ModelResponse(parts=[TextPart("Grey skies.")]),
        ModelRequest(parts=[UserPromptPart("Thanks")]),
    ]
    await save(store, "legacy", messages)
    detail = await get_conversation(store, "legacy")
    assert detail is not None
    assert [(t.turn_id, t.kind, t.user_text, t.reply_text, t.status) for t in detail.turns] == [
        (None, "reply", None, "Hi, I'm the assistant.", None),
        (None, "message", "Weather?", "Grey skies.", None),
        (None, "message", "Thanks", "", None),
    ]
    [tool] = detail.turns[1].tools
    assert tool.tool_name == "get_weather" and tool.result is not None and "grey" in tool.result
    assert detail.last_status is None and detail.last_user_text == "Thanks"


async def test_a_greeting_without_kind_is_a_turn_of_its_own(store: AgentStore) -> None:
    # As an older turn runner stored it: the session.start turn's greeting carried no "kind".
    await save(
        store, "conv", [reply("start", "Hello!", "completed"), user("t1", "Hi"), reply("t1", "Yes?", "completed")]
    )
    detail = await get_conversation(store, "conv")
    assert detail is not None
    assert [(t.turn_id, t.kind, t.reply_text) for t in detail.turns] == [
        ("start", "reply", "Hello!"),
        ("t1", "message", "Yes?"),
    ]


def test_unexpected_metadata_never_crashes() -> None:
    odd_user = ModelRequest(parts=[UserPromptPart(["look", "here"])], metadata={"role": "user", "turn_id": 7})
    odd_reply = ModelResponse(
        parts=[TextPart("Hm.")],
        metadata={"role": "assistant", "status": 3, "text_sent": None, "started_at": "yesterday"},
    )
    unknown_status = ModelResponse(parts=[TextPart("Eh.")], metadata={"turn_id": "t9", "status": "teleported"})
    not_a_dict = ModelResponse(parts=[TextPart("Odd.")])
    not_a_dict.metadata = cast(dict[str, Any], ["not", "a", "dict"])
    system_only = ModelRequest(parts=[], instructions="Be brief.", metadata={"role": "system"})
    broken_args = ModelResponse(parts=[ToolCallPart("t", "{not json", tool_call_id="x")], metadata={"role": "tool"})
    orphan_result = ModelRequest(parts=[ToolReturnPart("lookup", "found", tool_call_id="nobody")])
    turns = group_turns([odd_user, odd_reply, system_only, broken_args, orphan_result])
    assert [(t.turn_id, t.kind, t.user_text, t.reply_text, t.status) for t in turns] == [
        (None, "message", "look here", "Hm.", None)
    ]
    assert [(tool.tool_name, tool.result) for tool in turns[0].tools] == [("t", None), ("lookup", "found")]
    assert "INVALID_JSON" in turns[0].tools[0].args
    turns = group_turns([user("t8", "Hi"), unknown_status])
    assert [(t.turn_id, t.kind, t.reply_text, t.status) for t in turns] == [
        ("t8", "message", "", None),
        ("t9", "reply", "Eh.", "teleported"),
    ]
    assert [(t.kind, t.reply_text, t.status) for t in group_turns([not_a_dict])] == [("reply", "Odd.", None)]
    assert group_turns([]) == []


async def test_session_events_give_the_recording_and_the_transcript(store: AgentStore) -> None:
    await save(store, "conv", [user("t1", "Hi"), reply("t1", "Hello.", "completed")])
    transcript = [{"role": "user", "text": "Hi"}, {"role": "assistant", "text": "Hello."}]
    end = {"type": "session.end", "transcript": transcript, "latency": 420.5, "recording_status": "enabled"}
    await store.add_session_event("conv", "session.end", end, session_id="sess_1")
    update = {"type": "session.update", "recording_status": "completed", "recording_url": "https://rec/1.wav"}
    await store.add_session_event("conv", "session.update", update, session_id="sess_1")
    detail = await get_conversation(store, "conv")
    assert detail is not None
    assert [(e.event_type, e.session_id, e.payload) for e in detail.session_events] == [
        ("session.end", "sess_1", end),
        ("session.update", "sess_1", update),
    ]
    assert detail.recording_status == "completed"
    assert detail.recording_url == "https://rec/1.wav"
    assert detail.transcript == transcript
    # The JSON the CLI and the API print reads back to the same detail.
    assert ConversationDetail.model_validate_json(detail.model_dump_json()) == detail


async def test_a_conversation_with_only_session_events_is_found(store: AgentStore) -> None:
    await store.add_session_event("events_only", "session.end", {"transcript": None}, session_id=None)
    detail = await get_conversation(store, "events_only")
    assert detail is not None
    assert (detail.turns, detail.updated_at, detail.turn_count, detail.transcript) == ([], None, 0, None)
    assert detail.recording_status is None and detail.recording_url is None


async def test_usage_totals_come_from_the_stored_conversation(store: AgentStore) -> None:
    usage = RunUsage(requests=2, tool_calls=1, input_tokens=100, output_tokens=20)
    await save(store, "conv", [user("t1", "Hi"), reply("t1", "Hello.", "completed")], usage=usage)
    detail = await get_conversation(store, "conv")
    assert detail is not None
    assert detail.usage.model_dump() == {
        "requests": 2,
        "tool_calls": 1,
        "input_tokens": 100,
        "output_tokens": 20,
        "total_tokens": 120,
    }


async def test_list_is_newest_first_with_a_preview(store: AgentStore) -> None:
    long_words = "word " * 40
    await save(store, "older", [user("t1", "First call"), reply("t1", "Hi.", "completed")])
    await save(store, "newer", [user("t1", long_words), reply("t1", "Hm.", "failed")])
    summaries = await list_conversations(store)
    assert [s.conversation_id for s in summaries] == ["newer", "older"]
    newer, older = summaries
    assert (newer.turn_count, newer.last_status) == (1, "failed")
    assert newer.last_user_text is not None and len(newer.last_user_text) == PREVIEW_CHARS
    assert newer.last_user_text.endswith("…")
    assert older.last_user_text == "First call"
    assert [s.conversation_id for s in await list_conversations(store, limit=1)] == ["newer"]


async def test_get_and_delete_unknown_conversations(store: AgentStore) -> None:
    assert await get_conversation(store, "nobody") is None
    assert await delete_conversation(store, "nobody") is False


async def test_delete_removes_messages_and_session_events(store: AgentStore) -> None:
    await save(store, "conv", sample_messages())
    await store.add_session_event("conv", "session.end", {"transcript": []})
    await store.add_session_event("events_only", "session.update", {"recording_status": "failed"})
    assert await delete_conversation(store, "conv") is True
    assert await get_conversation(store, "conv") is None
    assert await store.session_events("conv") == []
    assert await delete_conversation(store, "conv") is False
    assert await delete_conversation(store, "events_only") is True
    assert await get_conversation(store, "events_only") is None
