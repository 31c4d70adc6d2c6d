from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from layercode_agent.protocol import (
    DataEvent,
    InterruptionContext,
    InvalidPayloadError,
    MalformedPayloadError,
    MessageEvent,
    PayloadError,
    SessionEndEvent,
    SessionStartEvent,
    SessionUpdateEvent,
    TranscriptEntry,
    UnknownEvent,
    parse_event,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_dict(name: str) -> dict[str, Any]:
    return json.loads(fixture(name))


def test_message() -> None:
    event = parse_event(fixture("message.json"))
    assert isinstance(event, MessageEvent)
    assert event.type == "message"
    assert event.text == "Hello, how are you?"
    assert event.session_id == "sess_abc123"
    assert event.conversation_id == "conv_xyz789"
    assert event.conversation_key == "conv_xyz789"
    assert event.turn_id == "turn_xyz123"
    assert event.from_phone_number == "+14155550123"
    assert event.to_phone_number == "+14155559876"
    assert event.custom_metadata == {"userId": "u_123", "plan": "pro"}
    assert event.metadata is None
    assert event.all_metadata == {"userId": "u_123", "plan": "pro"}
    assert event.interruption_context is None


def test_message_interrupted() -> None:
    event = parse_event(fixture("message_interrupted.json"))
    assert isinstance(event, MessageEvent)
    assert event.text == "Actually, what time is it?"
    assert event.interruption_context == InterruptionContext(
        previous_turn_interrupted=True, words_heard=4, text_heard="I am doing well,", assistant_turn_id="turn_xyz123"
    )


def test_interruption_context_defaults() -> None:
    context = InterruptionContext.model_validate({"unknown": 1})
    assert context == InterruptionContext(
        previous_turn_interrupted=False, words_heard=None, text_heard=None, assistant_turn_id=None
    )


def test_session_start() -> None:
    event = parse_event(fixture("session_start.json"))
    assert isinstance(event, SessionStartEvent)
    assert event.type == "session.start"
    assert event.turn_id == "turn_welcome_123"
    assert event.text is None
    assert (event.from_phone_number, event.to_phone_number) == ("+14155550123", "+14155559876")
    assert event.all_metadata == {}


def test_session_end() -> None:
    event = parse_event(fixture("session_end.json"))
    assert isinstance(event, SessionEndEvent)
    assert event.agent_id == "ag_123"
    assert event.started_at == "2024-08-28T12:40:00.000Z"
    assert event.ended_at == "2024-08-28T12:43:00.000Z"
    assert event.duration == 180000
    assert event.transcription_duration_seconds == 12.5
    assert event.tts_duration_seconds == 8.2
    assert event.latency == 120
    assert event.ip_address == "203.0.113.7"
    assert event.country_code == "US"
    assert event.recording_status == "enabled"
    assert event.turn_id is None
    assert event.transcript == [
        TranscriptEntry(role="user", text="Hello", timestamp=1724848800000),
        TranscriptEntry(role="assistant", text="Hi there!", timestamp=1724848805000),
    ]
    timestamp = event.transcript[0].timestamp
    assert isinstance(timestamp, int) and not isinstance(timestamp, bool)


def test_session_end_tolerates_iso_timestamps_and_null_transcript() -> None:
    body = fixture_dict("session_end.json")
    body["transcript"] = [{"role": "user", "text": "Hi", "timestamp": "2024-08-28T12:40:00Z"}, {"role": "assistant"}]
    event = parse_event(json.dumps(body))
    assert isinstance(event, SessionEndEvent)
    assert event.transcript[0].timestamp == "2024-08-28T12:40:00Z"
    assert event.transcript[1] == TranscriptEntry(role="assistant", text="", timestamp=None)

    body["transcript"] = None
    event = parse_event(json.dumps(body))
    assert isinstance(event, SessionEndEvent)
    assert event.transcript == []


def test_session_update() -> None:
    event = parse_event(fixture("session_update.json"))
    assert isinstance(event, SessionUpdateEvent)
    assert event.recording_status == "completed"
    assert event.recording_url == "https://api.layercode.com/v1/agents/ag_123/sessions/sess_abc123/recording"
    assert event.recording_duration == 42.3
    assert event.error_message is None
    assert event.metadata == {"userId": "u_123", "plan": "free"}
    assert event.custom_metadata == {"plan": "pro"}
    assert event.all_metadata == {"userId": "u_123", "plan": "pro"}  # custom_metadata wins


def test_data() -> None:
    event = parse_event(fixture("data.json"))
    assert isinstance(event, DataEvent)
    assert event.turn_id == "turn_xyz123"
    assert event.data == {"action": "select_item", "item": {"id": 42, "tags": ["a", "b"]}}


@pytest.mark.parametrize("value", [[1, "a"], "text", 5, 2.5, True, False, None])
def test_data_accepts_any_json(value: object) -> None:
    event = parse_event(json.dumps({"type": "data", "conversation_id": "c", "data": value}))
    assert isinstance(event, DataEvent)
    assert event.data == value
    assert type(event.data) is type(value)


def test_legacy_message_normalised() -> None:
    event = parse_event(fixture("legacy_message.json"))
    assert isinstance(event, MessageEvent)
    assert event.type == "message"
    assert event.conversation_id is None
    assert event.conversation_key == "sess_abc123"
    assert event.text == "Hello from the pipelines era"


@pytest.mark.parametrize(
    ("legacy", "cls"),
    [
        ("SESSION_START", SessionStartEvent),
        ("SESSION_END", SessionEndEvent),
        ("SESSION_UPDATE", SessionUpdateEvent),
        ("DATA", DataEvent),
    ],
)
def test_legacy_types_normalised(legacy: str, cls: type[object]) -> None:
    event = parse_event(json.dumps({"type": legacy, "session_id": "s"}))
    assert isinstance(event, cls)


def test_str_input_accepted() -> None:
    event = parse_event(fixture("message.json").decode())
    assert isinstance(event, MessageEvent)


def test_unknown_type_keeps_body() -> None:
    raw = {"type": "welcome", "conversation_id": "conv_1", "turn_id": "t", "whatever": {"nested": [1]}}
    event = parse_event(json.dumps(raw))
    assert isinstance(event, UnknownEvent)
    assert event.type == "welcome"
    assert event.conversation_key == "conv_1"
    assert event.turn_id == "t"
    assert event.body == raw


def test_unknown_extra_fields_ignored() -> None:
    body = fixture_dict("message.json") | {"connection_id": "conn_1", "usage": {"tokens": 3}, "text_extra": "x"}
    event = parse_event(json.dumps(body))
    assert isinstance(event, MessageEvent)
    assert "connection_id" not in event.model_dump()
    assert event.text == "Hello, how are you?"


def test_conversation_key_prefers_conversation_id() -> None:
    event = parse_event(b'{"type":"message","text":"x","session_id":"s","conversation_id":"c"}')
    assert event.conversation_key == "c"
    event = parse_event(b'{"type":"message","text":"x","session_id":"s"}')
    assert event.conversation_key == "s"


@pytest.mark.parametrize(
    ("raw", "error", "status", "message"),
    [
        pytest.param(b"", MalformedPayloadError, 400, "body is empty, expected a JSON object", id="empty"),
        pytest.param(
            b"not json",
            MalformedPayloadError,
            400,
            "body is not valid JSON: Expecting value at line 1 column 1",
            id="not-json",
        ),
        pytest.param(
            b'{"type": "message",\n "text": }',
            MalformedPayloadError,
            400,
            "body is not valid JSON: Expecting value at line 2 column 10",
            id="bad-json-position",
        ),
        pytest.param(b"[1]", MalformedPayloadError, 400, "body must be a JSON object, got an array", id="array"),
        pytest.param(b"null", MalformedPayloadError, 400, "body must be a JSON object, got null", id="null"),
        pytest.param(b'"hi"', MalformedPayloadError, 400, "body must be a JSON object, got a string", id="string"),
        pytest.param(
            b"\xff",
            MalformedPayloadError,
            400,
            "body is not valid UTF-8: invalid start byte at byte 0",
            id="invalid-utf8",
        ),
        pytest.param(b'{"no":"type"}', InvalidPayloadError, 422, "type: field required", id="no-type"),
        pytest.param(b'{"type":5}', InvalidPayloadError, 422, "type: must be a string", id="type-not-string"),
        pytest.param(
            b'{"type":"message","conversation_id":"c"}',
            InvalidPayloadError,
            422,
            "message event: text: field required",
            id="message-without-text",
        ),
        pytest.param(
            b'{"type":"message","text":"hi"}',
            InvalidPayloadError,
            422,
            "message event: either conversation_id or session_id is required",
            id="no-conversation-key",
        ),
        pytest.param(
            b'{"type":"MESSAGE","text":"hi","session_id":""}',
            InvalidPayloadError,
            422,
            "message event: either conversation_id or session_id is required",
            id="empty-session-id",
        ),
        pytest.param(
            b'{"type":"message","conversation_id":"c","text":["a"]}',
            InvalidPayloadError,
            422,
            "message event: text: input should be a valid string",
            id="text-not-string",
        ),
        pytest.param(
            b'{"type":"session.end","conversation_id":"c","transcript":[{"text":"x"}]}',
            InvalidPayloadError,
            422,
            "session.end event: transcript[0].role: field required",
            id="nested-location",
        ),
    ],
)
def test_bad_inputs(raw: bytes, error: type[PayloadError], status: int, message: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_event(raw)
    assert type(info.value) is error
    assert info.value.status_code == status
    assert str(info.value) == message
    assert info.value.message == message


def test_invalid_payload_lists_every_problem() -> None:
    with pytest.raises(InvalidPayloadError) as info:
        parse_event(b'{"type":"message","conversation_id":7,"turn_id":[],"text":"x"}')
    assert info.value.problems == (
        "conversation_id: input should be a valid string",
        "turn_id: input should be a valid string",
    )
    assert str(info.value) == "message event: " + "; ".join(info.value.problems)


def test_payload_errors_chain_the_cause() -> None:
    with pytest.raises(MalformedPayloadError) as info:
        parse_event(b"{")
    assert isinstance(info.value.__cause__, json.JSONDecodeError)
