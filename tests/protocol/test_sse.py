from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from layercode_agent.protocol import (
    SSE_CONTENT_TYPE,
    SSE_HEADERS,
    DataResponse,
    EndResponse,
    OutboundEvent,
    SSEParser,
    TTSResponse,
    adecode_stream,
    decode_stream,
    encode,
    encode_json,
    to_dict,
)


def test_constants() -> None:
    assert SSE_CONTENT_TYPE == "text/event-stream"
    assert SSE_HEADERS == {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}


def test_encode_tts_golden_bytes() -> None:
    event = TTSResponse(content="Hello", turn_id="turn_1")
    assert encode(event) == b'data: {"type":"response.tts","content":"Hello","turn_id":"turn_1"}\n\n'


def test_encode_end_golden_bytes() -> None:
    assert encode(EndResponse(turn_id="turn_1")) == b'data: {"type":"response.end","turn_id":"turn_1"}\n\n'


def test_encode_data_with_nested_object() -> None:
    event = DataResponse(content={"json": "object", "items": [1, {"ok": True}], "none": None}, turn_id="turn_xyz123")
    assert encode(event) == (
        b'data: {"type":"response.data","content":{"json":"object","items":[1,{"ok":true}],"none":null},'
        b'"turn_id":"turn_xyz123"}\n\n'
    )


def test_turn_id_key_always_present() -> None:
    assert encode(TTSResponse(content="Hi")) == b'data: {"type":"response.tts","content":"Hi","turn_id":null}\n\n'
    assert encode(EndResponse()) == b'data: {"type":"response.end","turn_id":null}\n\n'


def test_non_ascii_kept_as_utf8() -> None:
    frame = encode(TTSResponse(content="Grüße, 日本 👋", turn_id="t"))
    assert "Grüße, 日本 👋".encode() in frame
    assert b"\\u" not in frame


def test_text_that_is_not_unicode_is_framed_as_escapes_not_an_error() -> None:
    # Webhook bodies never get this far with a lone surrogate (the parser refuses them), but a model's text might.
    frame = encode(TTSResponse(content="Grüße \ud800", turn_id="t"))
    assert frame == b'data: {"type":"response.tts","content":"Gr\\u00fc\\u00dfe \\ud800","turn_id":"t"}\n\n'
    assert next(decode_stream([frame]))["content"] == "Grüße \ud800"


def test_newlines_in_content_stay_in_one_data_line() -> None:
    frame = encode(TTSResponse(content="line one\n\nline two\r\n", turn_id="t"))
    assert frame.count(b"\n") == 2
    assert frame.endswith(b"\n\n")
    assert next(decode_stream([frame]))["content"] == "line one\n\nline two\r\n"


def test_encode_json_is_the_payload_without_framing() -> None:
    event = TTSResponse(content="Hello", turn_id="turn_1")
    assert encode_json(event) == '{"type":"response.tts","content":"Hello","turn_id":"turn_1"}'
    assert encode(event) == b"data: " + encode_json(event).encode() + b"\n\n"


def test_data_content_not_plain_json_is_made_jsonable() -> None:
    class Item(BaseModel):
        name: str
        at: datetime.date

    event = DataResponse(content={"item": Item(name="x", at=datetime.date(2025, 1, 2))}, turn_id=None)
    assert json.loads(encode_json(event))["content"] == {"item": {"name": "x", "at": "2025-01-02"}}


@pytest.mark.parametrize(
    "event",
    [TTSResponse(content="a", turn_id="t"), DataResponse(content=[1, "2"], turn_id="t"), EndResponse(turn_id="t")],
    ids=["tts", "data", "end"],
)
def test_to_dict_matches_model_dump(event: OutboundEvent) -> None:
    assert to_dict(event) == event.model_dump()
    assert list(to_dict(event)) == list(event.model_dump())


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        (TTSResponse, {"content": "a", "text": "a"}),
        (DataResponse, {"content": {}, "extra": 1}),
        (EndResponse, {"content": "x"}),
    ],
)
def test_responses_forbid_extra_fields(model: type[BaseModel], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs are not permitted"):
        model(**kwargs)


def test_response_type_tag_is_fixed() -> None:
    assert TTSResponse(content="a").type == "response.tts"
    assert DataResponse(content=None).type == "response.data"
    assert EndResponse().type == "response.end"
    with pytest.raises(ValidationError):
        TTSResponse.model_validate({"type": "response.end", "content": "a"})


def test_tts_content_required() -> None:
    with pytest.raises(ValidationError, match="content"):
        TTSResponse.model_validate({"turn_id": "t"})


STREAM = (
    b'data: {"type":"response.tts","content":"Hi","turn_id":"t1"}\n\n'
    b'data: {"type":"response.data","content":{"a":[1,2]},"turn_id":"t1"}\n\n'
    b'data: {"type":"response.end","turn_id":"t1"}\n\n'
)
EXPECTED = [
    {"type": "response.tts", "content": "Hi", "turn_id": "t1"},
    {"type": "response.data", "content": {"a": [1, 2]}, "turn_id": "t1"},
    {"type": "response.end", "turn_id": "t1"},
]


def test_parser_round_trips_encode() -> None:
    events: list[OutboundEvent] = [
        TTSResponse(content="Grüße 👋", turn_id="t"),
        DataResponse(content={"n": [1.5, None]}, turn_id="t"),
        EndResponse(turn_id="t"),
    ]
    stream = b"".join(encode(event) for event in events)
    assert SSEParser().feed(stream) == [to_dict(event) for event in events]


def test_parser_whole_stream_in_one_chunk() -> None:
    assert SSEParser().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_parser_split_chunks(size: int) -> None:
    stream = STREAM.replace(b'"Hi"', '"Hï 👋"'.encode())
    parser = SSEParser()
    events: list[dict[str, Any]] = []
    for i in range(0, len(stream), size):
        events.extend(parser.feed(stream[i : i + size]))
    assert [e["type"] for e in events] == ["response.tts", "response.data", "response.end"]
    assert events[0]["content"] == "Hï 👋"


def test_parser_returns_events_only_when_complete() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"type":"response.end",') == []
    assert parser.feed(b'"turn_id":"t"}\n') == []
    assert parser.feed(b"\n") == [{"type": "response.end", "turn_id": "t"}]


def test_parser_ignores_comments_and_other_fields() -> None:
    stream = b": keep-alive\n\nevent: message\nid: 7\nretry: 1000\n" + STREAM[: STREAM.index(b"\n\n") + 2]
    assert SSEParser().feed(stream) == EXPECTED[:1]


def test_parser_crlf_and_cr_line_endings() -> None:
    assert SSEParser().feed(STREAM.replace(b"\n", b"\r\n")) == EXPECTED
    assert SSEParser().feed(STREAM.replace(b"\n", b"\r")) == EXPECTED


def test_parser_crlf_split_between_chunks() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"type":"response.end","turn_id":"t"}\r') == []
    assert parser.feed(b"\n\r") == [{"type": "response.end", "turn_id": "t"}]
    assert parser.feed(b"\n") == []


def test_parser_lf_completing_split_crlf_is_not_a_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"type":"response.end",\r') == []
    # Were this "\n" a line end of its own, the half object above would be dispatched (and fail to decode).
    assert parser.feed(b'\ndata: "turn_id":"t"}\r\n\r\n') == [{"type": "response.end", "turn_id": "t"}]


def test_parser_joins_multi_line_data() -> None:
    stream = b'data: {"type":"response.tts",\ndata:"content":"a",\ndata: "turn_id":null}\n\n'
    assert SSEParser().feed(stream) == [{"type": "response.tts", "content": "a", "turn_id": None}]


def test_parser_drops_unterminated_event() -> None:
    assert list(decode_stream([b'data: {"type":"response.end","turn_id":"t"}\n'])) == []


def test_parser_rejects_non_object_data() -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        SSEParser().feed(b"data: [1]\n\n")
    with pytest.raises(json.JSONDecodeError):
        SSEParser().feed(b"data: nope\n\n")


def test_decode_stream() -> None:
    chunks = [STREAM[:10], STREAM[10:70], STREAM[70:]]
    assert list(decode_stream(chunks)) == EXPECTED


def test_adecode_stream() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(STREAM), 5):
            yield STREAM[i : i + 5]

    async def collect() -> list[dict[str, Any]]:
        return [event async for event in adecode_stream(chunks())]

    assert asyncio.run(collect()) == EXPECTED
