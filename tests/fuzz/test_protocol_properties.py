"""Properties of the pure protocol layer: `verify`, `sign` and `parse_event` on any input.

Whatever the bytes of a body or a `layercode-signature` header, the protocol layer either answers or raises its own
error (`SignatureError`, `PayloadError` with status 400 or 422), never anything else: anything else would reach the
server as a 500. Every test is derandomised with a bounded number of examples, so CI runs the same cases every time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from layercode_agent.protocol import (
    DEFAULT_TOLERANCE,
    DataEvent,
    InvalidPayloadError,
    MalformedPayloadError,
    MessageEvent,
    PayloadError,
    SessionEndEvent,
    SessionStartEvent,
    SessionUpdateEvent,
    SignatureError,
    UnknownEvent,
    parse_event,
    sign,
    verify,
)

from .strategies import (
    EVENT_CLASSES,
    LEGACY_TYPES,
    MAX_SECONDS,
    RECENT,
    almost_valid_headers,
    bodies_with_a_lone_surrogate,
    genuine_headers,
    json_event_bodies,
)

SECRET: Final = "whsec_fuzz_secret"
NOW: Final = RECENT
"""The verifier's clock in these tests, so timestamps near it are fresh and others stale."""

PROPERTY: Final = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],  # generation time varies with the machine, the cases do not
)
"""Fixed and reproducible (no example database, a seed derived from each test), and quick: pure functions."""


@st.composite
def bodies_and_headers(draw: st.DrawFn) -> tuple[bytes, str | None]:
    body = draw(st.binary(max_size=300))
    header = draw(
        st.none() | st.text(max_size=80) | almost_valid_headers() | genuine_headers(body, secret=SECRET, now=NOW)
    )
    return body, header


# --- verify ------------------------------------------------------------------------------------------------------


def test_verify_answers_any_body_and_header_with_a_timestamp_or_a_signature_error() -> None:
    outcomes: set[str] = set()

    @PROPERTY
    @given(case=bodies_and_headers(), secrets=st.sampled_from([SECRET, [SECRET, "whsec_other"], "", [""], []]))
    def check(case: tuple[bytes, str | None], secrets: str | list[str]) -> None:
        body, header = case
        try:
            timestamp = verify(body, header, secrets, now=NOW)
        except SignatureError as exc:
            assert exc.reason and str(exc) == exc.reason
            outcomes.add("refused")
            return
        # Accepted: only possible for a fresh header that carries our HMAC of this very body.
        assert header is not None
        assert abs(NOW - timestamp) <= DEFAULT_TOLERANCE
        assert sign(body, SECRET, timestamp=timestamp).split("v1=")[1] in header.lower()
        outcomes.add("accepted")

    check()  # a property defined inside the test, so the test can assert on what its examples reached
    assert outcomes == {"accepted", "refused"}


@PROPERTY
@given(header=st.text(max_size=200), body=st.binary(max_size=64), tolerance=st.integers(min_value=0, max_value=10**6))
def test_verify_refuses_random_text_headers(header: str, body: bytes, tolerance: int) -> None:
    with pytest.raises(SignatureError):
        verify(body, header, SECRET, now=NOW, tolerance=tolerance)


# --- sign and verify together ---------------------------------------------------------------------------------------

timestamps = st.integers(min_value=0, max_value=MAX_SECONDS)
secrets_text = st.text(min_size=1, max_size=40)


def same_hmac_key(first: str, second: str) -> bool:
    """HMAC pads keys shorter than its block with zero bytes, so `"k"` and `"k\\0"` are the same key."""
    return first.encode().rstrip(b"\0") == second.encode().rstrip(b"\0")


@PROPERTY
@given(body=st.binary(max_size=512), secret=secrets_text, timestamp=timestamps)
def test_a_signature_verifies_on_the_same_body_secret_and_time(body: bytes, secret: str, timestamp: int) -> None:
    header = sign(body, secret, timestamp=timestamp)
    assert verify(body, header, secret, now=timestamp) == timestamp
    # The tolerance is inclusive, either way.
    assert verify(body, header, secret, now=timestamp + DEFAULT_TOLERANCE) == timestamp
    assert verify(body, header, secret, now=timestamp - DEFAULT_TOLERANCE) == timestamp
    # The header parser's documented leniency: spacing, part order, upper-case hex, extra and unknown parts.
    t_part, v1_part = header.split(",")
    for variant in (
        f" {v1_part} , {t_part} ",
        f"{t_part},{v1_part.upper().replace('V1=', 'v1=')}",
        f"{t_part},v1={'0' * 64},{v1_part},v2=whatever,",
    ):
        assert verify(body, variant, secret, now=timestamp) == timestamp


@PROPERTY
@given(body=st.binary(min_size=1, max_size=512), secret=secrets_text, timestamp=timestamps, data=st.data())
def test_changing_any_one_byte_of_the_body_is_refused(
    body: bytes, secret: str, timestamp: int, data: st.DataObject
) -> None:
    header = sign(body, secret, timestamp=timestamp)
    index = data.draw(st.integers(min_value=0, max_value=len(body) - 1), label="index")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    tampered = body[:index] + bytes([body[index] ^ flip]) + body[index + 1 :]
    with pytest.raises(SignatureError, match="does not match"):
        verify(tampered, header, secret, now=timestamp)


@PROPERTY
@given(body=st.binary(max_size=256), secret=secrets_text, other=secrets_text, timestamp=timestamps)
def test_another_secret_is_refused(body: bytes, secret: str, other: str, timestamp: int) -> None:
    if same_hmac_key(secret, other):
        return
    header = sign(body, secret, timestamp=timestamp)
    with pytest.raises(SignatureError, match="does not match"):
        verify(body, header, other, now=timestamp)


@PROPERTY
@given(
    body=st.binary(max_size=256),
    timestamp=st.integers(min_value=0, max_value=10**12),
    beyond=st.integers(min_value=1, max_value=10**9) | st.floats(min_value=0.5, max_value=1e9),
    tolerance=st.integers(min_value=0, max_value=86_400),
    late=st.booleans(),
)
def test_a_clock_beyond_the_tolerance_is_refused(
    body: bytes, timestamp: int, beyond: float, tolerance: int, late: bool
) -> None:
    header = sign(body, SECRET, timestamp=timestamp)
    now = timestamp + tolerance + beyond if late else timestamp - tolerance - beyond
    with pytest.raises(SignatureError, match="older than" if late else "in the future"):
        verify(body, header, SECRET, now=now, tolerance=tolerance)
    assert verify(body, header, SECRET, now=timestamp, tolerance=tolerance) == timestamp


@PROPERTY
@given(
    body=st.binary(max_size=256),
    keys=st.lists(secrets_text, min_size=1, max_size=4, unique_by=lambda key: key.encode().rstrip(b"\0")),
    timestamp=timestamps,
    data=st.data(),
)
def test_during_a_rotation_any_one_of_the_secrets_is_accepted(
    body: bytes, keys: list[str], timestamp: int, data: st.DataObject
) -> None:
    signer = data.draw(st.sampled_from(keys), label="signer")
    header = sign(body, signer, timestamp=timestamp)
    configured = data.draw(st.permutations([*keys, ""]), label="configured")  # empty entries are ignored
    assert verify(body, header, configured, now=timestamp) == timestamp
    others = [key for key in keys if key != signer]
    with pytest.raises(SignatureError):
        verify(body, header, others, now=timestamp)


@PROPERTY
@given(
    body=st.binary(max_size=64),
    timestamp=st.integers(max_value=-1) | st.integers(min_value=MAX_SECONDS + 1, max_value=10**40),
)
def test_timestamps_verify_cannot_read_are_refused_not_crashed(body: bytes, timestamp: int) -> None:
    header = sign(body, SECRET, timestamp=timestamp)
    with pytest.raises(SignatureError, match="malformed"):
        verify(body, header, SECRET, now=timestamp)


# --- parse_event --------------------------------------------------------------------------------------------------


def assert_payload_error(exc: PayloadError) -> None:
    """The two kinds, each with its status, and a message saying what is wrong."""
    assert isinstance(exc, MalformedPayloadError | InvalidPayloadError)
    assert exc.status_code == (400 if isinstance(exc, MalformedPayloadError) else 422)
    assert exc.message and str(exc) == exc.message


@PROPERTY
@given(raw=st.binary(max_size=400) | st.text(max_size=200))
def test_parse_event_returns_an_event_or_raises_a_payload_error_for_any_input(raw: bytes | str) -> None:
    try:
        event = parse_event(raw)
    except PayloadError as exc:
        assert_payload_error(exc)
        return
    assert isinstance(
        event, MessageEvent | SessionStartEvent | SessionEndEvent | SessionUpdateEvent | DataEvent | UnknownEvent
    )
    assert event.conversation_key


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((Path(__file__).parents[1] / "fixtures" / name).read_text())


def test_json_event_bodies_validate_or_fail_with_a_422() -> None:
    outcomes: set[str] = set()

    @PROPERTY
    @given(body=json_event_bodies(), ascii_only=st.booleans())
    # Layercode's own bodies, so every model is reached whatever the generated examples happen to be.
    @example(body=_fixture("message.json"), ascii_only=False)
    @example(body=_fixture("session_start.json"), ascii_only=False)
    @example(body=_fixture("session_end.json"), ascii_only=True)
    @example(body=_fixture("session_update.json"), ascii_only=False)
    @example(body=_fixture("data.json"), ascii_only=False)
    @example(body={"type": "agent.moved", "conversation_id": "c"}, ascii_only=False)
    @example(body={"type": "message", "conversation_id": 5}, ascii_only=False)
    def check(body: dict[str, Any], ascii_only: bool) -> None:
        raw = json.dumps(body, ensure_ascii=ascii_only).encode()
        try:
            event = parse_event(raw)
        except PayloadError as exc:
            assert_payload_error(exc)
            assert isinstance(exc, InvalidPayloadError), "a JSON object is never malformed"
            outcomes.add("invalid")
            return
        kind = body["type"]
        assert isinstance(kind, str)
        kind = LEGACY_TYPES.get(kind, kind)
        assert isinstance(event, EVENT_CLASSES.get(kind, UnknownEvent))
        assert event.type == kind
        assert event.conversation_key == (body.get("conversation_id") or body.get("session_id"))
        if isinstance(event, UnknownEvent):
            assert event.body == body
        outcomes.add(type(event).__name__)

    check()  # a property defined inside the test, so the test can assert on what its examples reached
    # Every model and the validation errors are reached, not only the JSON decoder.
    assert outcomes == {*(cls.__name__ for cls in EVENT_CLASSES.values()), "UnknownEvent", "invalid"}


@PROPERTY
@given(body=bodies_with_a_lone_surrogate(), as_text=st.booleans())
def test_a_lone_surrogate_anywhere_in_a_body_is_a_400_that_says_so(body: dict[str, Any], as_text: bool) -> None:
    # As a JSON encoder writes it (a `\udXXX` escape), or already decoded in text given to the parser.
    raw: bytes | str = json.dumps(body, ensure_ascii=False) if as_text else json.dumps(body).encode()
    with pytest.raises(MalformedPayloadError) as info:
        parse_event(raw)
    assert_payload_error(info.value)
    assert "lone surrogate" in info.value.message
    info.value.message.encode()  # The reason is Unicode text itself: it can be logged and sent back.


# --- Found by fuzzing: JSON the decoder itself cannot read (it once escaped as a 500) ------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 100_000, id="deeply-nested-array"),
        pytest.param(b"1" * 4301, id="integer-over-4300-digits"),
    ],
)
def test_json_the_decoder_cannot_read_is_a_malformed_payload(raw: bytes) -> None:
    with pytest.raises(MalformedPayloadError):
        parse_event(raw)
