"""JSON bodies decoded once, the same way for every route: text that is not Unicode and nesting too deep are refused.

A lone UTF-16 surrogate escape (`"\\ud800"`) is valid JSON but not Unicode text: it cannot be encoded as UTF-8, so it
once broke the reply stream (in `turn_id`) or gave a 500 (in `conversation_id`, a transcript) far from the parser.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from layercode_agent.protocol import MAX_JSON_DEPTH, MalformedPayloadError, MessageEvent, load_json_object, parse_event

MESSAGE: dict[str, Any] = {"type": "message", "conversation_id": "conv_1", "turn_id": "turn_1", "text": "hi"}


def escaped(body: dict[str, Any]) -> bytes:
    """`body` as ASCII JSON, so a lone surrogate in it travels as a `\\udXXX` escape, as a JSON encoder writes it."""
    return json.dumps(body, ensure_ascii=True).encode()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({**MESSAGE, "turn_id": "t\ud800"}, "turn_id", id="turn_id"),
        pytest.param({**MESSAGE, "text": "I said \udfff"}, "text", id="text"),
        pytest.param({"type": "data", "conversation_id": "c\ud800", "data": {}}, "conversation_id", id="data-id"),
        pytest.param({"type": "session.end", "conversation_id": "\udc00x"}, "conversation_id", id="session-end-id"),
        pytest.param(
            {
                "type": "session.end",
                "conversation_id": "c",
                "transcript": [{"role": "user", "text": "ok"}, {"role": "user", "text": "\ud83d"}],
            },
            "transcript[1].text",
            id="transcript",
        ),
        pytest.param({**MESSAGE, "metadata": {"user": {"name": "\ud800"}}}, "metadata.user.name", id="nested-metadata"),
        pytest.param({**MESSAGE, "custom_metadata": {"tags": ["a", "b\udbff"]}}, "custom_metadata.tags[1]", id="list"),
        pytest.param({"type": "data", "conversation_id": "c", "data": ["\ud800"]}, "data[0]", id="data"),
        pytest.param(
            {**MESSAGE, "interruption_context": {"text_heard": "\ude00"}},
            "interruption_context.text_heard",
            id="interruption-context",
        ),
        pytest.param({**MESSAGE, "type": "message\ud800"}, "type", id="type"),
        pytest.param({**MESSAGE, "metadata": {"k\ud800": 1}}, "metadata['k\\ud800']", id="key"),
        pytest.param({**MESSAGE, "unknown_field": "\ud800"}, "unknown_field", id="ignored-field"),
    ],
)
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(MalformedPayloadError) as info:
        parse_event(escaped(body))
    assert info.value.status_code == 400
    assert str(info.value).startswith(f"{field}: ")
    assert "surrogate" in str(info.value)
    # The reason itself is Unicode: it can be logged and sent back as UTF-8.
    str(info.value).encode()


def test_a_lone_surrogate_in_text_input_is_refused_too() -> None:
    raw = json.dumps({**MESSAGE, "turn_id": "t\ud800"}, ensure_ascii=False)
    with pytest.raises(MalformedPayloadError, match="^turn_id: "):
        parse_event(raw)


def test_a_surrogate_pair_is_ordinary_text() -> None:
    event = parse_event(b'{"type":"message","conversation_id":"c","text":"smile \\ud83d\\ude00"}')
    assert isinstance(event, MessageEvent)
    assert event.text == "smile \U0001f600"


def test_the_first_bad_field_in_document_order_is_named() -> None:
    with pytest.raises(MalformedPayloadError, match=r"^metadata\.a: "):
        parse_event(escaped({"metadata": {"a": "\ud800", "b": "\ud800"}, **MESSAGE, "text": "\ud800"}))


def nested(depth: int) -> Any:
    """A value that is `depth` arrays deep."""
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_up_to_the_limit_is_accepted() -> None:
    # The body object is one level, `data` the rest.
    body = {"type": "data", "conversation_id": "c", "data": nested(MAX_JSON_DEPTH - 1)}
    assert load_json_object(json.dumps(body))["data"] == body["data"]


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 900, 5000, 100_000])
def test_nesting_deeper_than_the_limit_is_a_400(depth: int) -> None:
    # 900 decodes, but would fail the next encoder deeper in the stack; 5000 and more fail the decoder itself.
    raw = '{"type":"data","conversation_id":"c","data":' + "[" * depth + "]" * depth + "}"
    with pytest.raises(MalformedPayloadError, match="nested too deeply") as info:
        parse_event(raw)
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "body is empty, expected a JSON object"),
        (b"\xed\xa0\x80", "body is not valid UTF-8"),  # A surrogate encoded as bytes (CESU-8) is not UTF-8.
        (b"[]", "body must be a JSON object, got an array"),
        (b"{", "body is not valid JSON"),
    ],
)
def test_load_json_object_refuses_what_parse_event_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedPayloadError, match=message):
        load_json_object(raw)
    with pytest.raises(MalformedPayloadError, match=message):
        parse_event(raw)
