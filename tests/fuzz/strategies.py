"""Hypothesis strategies for Layercode webhook bodies and signature headers, shared by the fuzz tests."""

from __future__ import annotations

from typing import Any, Final

from hypothesis import strategies as st

from layercode_agent.protocol import (
    DEFAULT_TOLERANCE,
    DataEvent,
    InboundEvent,
    MessageEvent,
    SessionEndEvent,
    SessionStartEvent,
    SessionUpdateEvent,
    UnknownEvent,
    sign,
)

MAX_SECONDS: Final = 10**15 - 1
"""The largest timestamp `verify` reads: it accepts at most 15 digits."""

RECENT: Final = 1_760_000_000
"""A plausible signing time (Oct 2025) for headers that should look fresh."""

KNOWN_TYPES: Final = ("message", "session.start", "session.end", "session.update", "data")
LEGACY_TYPES: Final = {
    "MESSAGE": "message",
    "SESSION_START": "session.start",
    "SESSION_END": "session.end",
    "SESSION_UPDATE": "session.update",
    "DATA": "data",
}
EVENT_CLASSES: Final[dict[str, type[InboundEvent]]] = {
    "message": MessageEvent,
    "session.start": SessionStartEvent,
    "session.end": SessionEndEvent,
    "session.update": SessionUpdateEvent,
    "data": DataEvent,
}


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
"""Any JSON value, shallow (nesting far below the ~1000 levels where `json.loads` itself gives up; tested apart)."""

digits = st.integers(min_value=0, max_value=MAX_SECONDS).map(str)
timestamp_texts = (
    digits
    | st.integers(min_value=RECENT - 2 * DEFAULT_TOLERANCE, max_value=RECENT + 2 * DEFAULT_TOLERANCE).map(str)
    | st.sampled_from(["", "-1", "+1760000000", "1.5", "1e9", "0x10", " 12 ", "١٧٦٠", "9" * 16, "9" * 400])
    | st.text(max_size=8)
)
hex_texts = st.text(alphabet="0123456789abcdefABCDEF", max_size=70) | st.text(max_size=8)


@st.composite
def almost_valid_headers(draw: st.DrawFn) -> str:
    """The right shape, `t=<digits>,v1=<hex>`, with random values, parts, order, spacing and separators."""
    parts = [f"t={draw(timestamp_texts)}", f"v1={draw(hex_texts)}"]
    parts += draw(
        st.lists(
            st.sampled_from(["v1=", "t=1", "v0=abc", "v2=zz", "", "x", "=", "t", "v1", "v1==ab"])
            | st.builds("{}={}".format, st.text(max_size=3), st.text(max_size=5)),
            max_size=3,
        )
    )
    parts = draw(st.permutations(parts))
    separator = draw(st.sampled_from([",", ", ", " , ", ";", ",,"]))
    return separator.join(parts)


def genuine_headers(body: bytes, *, secret: str, now: int) -> st.SearchStrategy[str]:
    """Headers really signed over `body`: with `secret` or another one, fresh or stale at `now`, sometimes altered."""
    signed = st.builds(
        lambda key, timestamp: sign(body, key, timestamp=timestamp),
        st.just(secret) | st.text(min_size=1, max_size=10),
        st.integers(min_value=now - 2 * DEFAULT_TOLERANCE, max_value=now + 2 * DEFAULT_TOLERANCE)
        | st.integers(min_value=0, max_value=MAX_SECONDS),
    )
    alter = st.sampled_from(
        [
            lambda header: header,
            str.upper,
            lambda header: header.replace(",", " , "),
            lambda header: ",".join(reversed(header.split(","))),
            lambda header: header + ",v1=" + "0" * 64,
            lambda header: header[:-1],
            lambda header: header + "0",
            lambda header: header.replace("t=", "t= 0"),
        ]
    )
    return st.builds(lambda header, change: change(header), signed, alter)


def typed_fields() -> dict[str, st.SearchStrategy[Any]]:
    """A well-typed value for every field the inbound models read."""
    ids = st.text(max_size=10) | st.sampled_from(["conv_1", "sess_1", ""])
    texts = st.text(max_size=20)
    numbers = st.integers(min_value=0, max_value=10**9) | st.floats(allow_nan=False, allow_infinity=False)
    objects = st.dictionaries(st.text(max_size=6), json_values, max_size=3)
    transcript_entries = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"])},
        optional={"text": texts, "timestamp": numbers | texts | st.none()},
    )
    interruption = st.fixed_dictionaries(
        {},
        optional={
            "previous_turn_interrupted": st.booleans(),
            "words_heard": st.integers(min_value=0, max_value=500),
            "text_heard": texts,
            "assistant_turn_id": ids,
        },
    )
    return {
        "session_id": ids,
        "conversation_id": ids,
        "turn_id": ids,
        "custom_metadata": objects,
        "metadata": objects,
        "from_phone_number": texts,
        "to_phone_number": texts,
        "text": texts,
        "interruption_context": interruption,
        "agent_id": ids,
        "started_at": texts,
        "ended_at": texts,
        "duration": numbers,
        "transcription_duration_seconds": numbers,
        "tts_duration_seconds": numbers,
        "latency": numbers,
        "ip_address": texts,
        "country_code": texts,
        "recording_status": st.sampled_from(["enabled", "disabled", "completed", "failed"]) | texts,
        "recording_url": texts,
        "recording_duration": numbers,
        "error_message": texts,
        "transcript": st.lists(transcript_entries, max_size=3),
        "data": json_values,
        "body": json_values,
    }


TYPED_FIELDS: Final = typed_fields()
event_types = st.sampled_from([*KNOWN_TYPES, *LEGACY_TYPES, "agent.thinking", "", "Message"]) | st.text(max_size=8)


@st.composite
def json_event_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """JSON objects shaped like webhook bodies: a `type` (known, legacy or unknown) and that event's fields, well
    typed; then, one time in two, one field replaced by any JSON value (a non-string `type` too), the `type`
    dropped, or the conversation ids dropped."""
    kind = draw(event_types)
    model = EVENT_CLASSES.get(LEGACY_TYPES.get(kind, kind), UnknownEvent)
    # An unknown type may come with any field at all.
    names = sorted(TYPED_FIELDS) if model is UnknownEvent else sorted(set(model.model_fields) - {"type"})
    body: dict[str, Any] = {"type": kind, "conversation_id": draw(TYPED_FIELDS["conversation_id"])}
    body |= draw(st.fixed_dictionaries({}, optional={name: TYPED_FIELDS[name] for name in names}))
    change = draw(st.sampled_from(["none", "none", "none", "retype", "drop type", "drop ids"]))
    if change == "retype":
        body[draw(st.sampled_from(["type", *names]), label="retyped")] = draw(json_values, label="value")
    elif change == "drop type":
        del body["type"]
    elif change == "drop ids":
        body.pop("conversation_id")
        body.pop("session_id", None)
    return body


lone_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
"""One UTF-16 surrogate: valid in a JSON `\\u` escape, but not Unicode text on its own (it has no UTF-8 encoding)."""
not_unicode_texts = st.builds(
    lambda head, surrogate, tail: head + surrogate + tail, st.text(max_size=4), lone_surrogates, st.text(max_size=4)
)
"""Text with exactly one lone surrogate (the text around it has none, so it can never pair up)."""


def _string_spots(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], bool]]:
    """Where `value` holds a string: `(path, is_key)` for every string value and every object key, at any depth."""
    if isinstance(value, str):
        return [(path, False)]
    spots: list[tuple[tuple[str | int, ...], bool]] = []
    if isinstance(value, dict):
        for key, child in value.items():  # pyright: ignore[reportUnknownVariableType]
            spots.append(((*path, str(key)), True))  # pyright: ignore[reportUnknownArgumentType]
            spots += _string_spots(child, (*path, str(key)))  # pyright: ignore[reportUnknownArgumentType]
    elif isinstance(value, list):
        for index, child in enumerate(value):  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
            spots += _string_spots(child, (*path, index))
    return spots


@st.composite
def bodies_with_a_lone_surrogate(draw: st.DrawFn) -> dict[str, Any]:
    """A body of `json_event_bodies` with one string, value or key at any depth (or a new field), made not Unicode:
    JSON encoders write it as a `\\udXXX` escape, which decodes to text that cannot be stored, logged or streamed."""
    body = draw(json_event_bodies())
    spots = _string_spots(body)
    bad = draw(not_unicode_texts, label="bad text")
    if not spots or draw(st.booleans(), label="new field"):
        body[bad] = draw(json_values, label="new value")
        return body
    path, is_key = draw(st.sampled_from(spots), label="spot")
    parent: Any = body
    for step in path[:-1]:
        parent = parent[step]
    if is_key:
        parent[bad] = parent.pop(path[-1])
    else:
        parent[path[-1]] = bad
    return body
