from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, replace

import pytest
from pydantic import SecretStr

from layercode_agent.protocol import DEFAULT_TOLERANCE, SIGNATURE_HEADER, SignatureError, check_header, sign, verify

SECRET = "whsec_test_secret"
OTHER_SECRET = "whsec_other_secret"
NOW = 1_724_848_800
BODY = b'{"type":"message","session_id":"sess_abc123","conversation_id":"conv_xyz789","text":"Hello"}'


@dataclass(frozen=True)
class Signed:
    """A signed request; each test breaks exactly one field."""

    body: bytes = BODY
    secret: str = SECRET
    timestamp: int = NOW
    now: float = NOW

    @property
    def header(self) -> str:
        return sign(self.body, self.secret, timestamp=self.timestamp)

    def verify(self, *, header: str | None = None, body: bytes | None = None, secrets: str | list[str] = SECRET) -> int:
        return verify(
            self.body if body is None else body,
            self.header if header is None else header,
            secrets,
            now=self.now,
        )


def reason(
    signed: Signed, *, header: str | None = None, body: bytes | None = None, secrets: str | list[str] = SECRET
) -> str:
    """Verify, expecting failure, and return the reason."""
    with pytest.raises(SignatureError) as info:
        signed.verify(header=header, body=body, secrets=secrets)
    assert str(info.value) == info.value.reason
    return info.value.reason


def test_constants() -> None:
    assert SIGNATURE_HEADER == "layercode-signature"
    assert DEFAULT_TOLERANCE == 300


def test_valid_signature_returns_timestamp() -> None:
    assert Signed().verify() == NOW


def test_sign_format() -> None:
    header = sign(BODY, SECRET, timestamp=NOW)
    t, v1 = header.split(",")
    assert t == f"t={NOW}"
    assert v1.startswith("v1=")
    assert len(v1.removeprefix("v1=")) == 64


def test_sign_defaults_to_current_time() -> None:
    before = int(time.time())
    header = sign(BODY, SECRET)
    assert verify(BODY, header, SECRET) >= before


def test_matches_docs_reference_algorithm() -> None:
    header = sign(BODY, SECRET, timestamp=NOW)
    # The reference Python from the protocol doc, section 1.2, verbatim apart from names.
    parts = dict(p.split("=", 1) for p in header.split(","))
    t, sig = parts["t"], parts["v1"]
    expected = hmac.new(SECRET.encode(), t.encode() + b"." + BODY, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, sig)


def test_valid_with_second_of_several_secrets() -> None:
    assert Signed(secret=OTHER_SECRET).verify(secrets=[SECRET, OTHER_SECRET]) == NOW


def test_empty_secret_strings_are_ignored() -> None:
    assert Signed().verify(secrets=["", SECRET]) == NOW


def test_wrong_secret() -> None:
    assert reason(Signed(secret=OTHER_SECRET)) == "signature does not match (checked 1 secret)"


def test_wrong_secret_reports_number_of_secrets_checked() -> None:
    signed = Signed(secret="whsec_attacker")
    assert reason(signed, secrets=[SECRET, OTHER_SECRET]) == "signature does not match (checked 2 secrets)"


def test_body_changed_by_one_byte() -> None:
    tampered = BODY.replace(b"Hello", b"Hellp")
    assert len(tampered) == len(BODY)
    assert reason(Signed(), body=tampered).startswith("signature does not match")


def test_reserialised_json_with_spaces_fails() -> None:
    reserialised = json.dumps(json.loads(BODY)).encode()  # default separators add spaces
    assert reserialised != BODY
    assert reason(Signed(), body=reserialised).startswith("signature does not match")


def test_missing_header() -> None:
    with pytest.raises(SignatureError, match=r"^missing layercode-signature header$"):
        verify(BODY, None, SECRET, now=NOW)


@pytest.mark.parametrize("header", ["", "   "])
def test_empty_header(header: str) -> None:
    assert reason(Signed(), header=header) == "empty layercode-signature header"


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        pytest.param("v1=abcdef", "no t= part", id="no-t"),
        pytest.param(f"t={NOW}", "no v1= part", id="no-v1"),
        pytest.param("t=soon,v1=abcdef", "t='soon' is not an integer number of seconds", id="non-numeric-t"),
        pytest.param("t=-5,v1=abcdef", "t='-5' is not an integer number of seconds", id="negative-t"),
        pytest.param(f"t={NOW},v1=xyz", "v1='xyz' is not hex", id="non-hex-v1"),
        pytest.param(f"t={NOW},v1=", "v1='' is not hex", id="empty-v1"),
        pytest.param(f"t={NOW},t={NOW},v1=ab", "more than one t= part", id="two-t"),
        pytest.param("garbage", "part 'garbage' is not 'key=value'", id="garbage"),
    ],
)
def test_malformed_header(header: str, detail: str) -> None:
    expected = f"malformed layercode-signature header: expected 't=<unix seconds>,v1=<hex hmac>' ({detail})"
    assert reason(Signed(), header=header) == expected


def test_stale_timestamp_fails_after_tolerance() -> None:
    signed = Signed(now=NOW + 301)
    assert reason(signed) == f"timestamp {NOW} is 301 s old, older than the 300 s tolerance"


def test_stale_timestamp_ok_at_tolerance() -> None:
    assert Signed(now=NOW + 300).verify() == NOW


def test_future_timestamp_fails_after_tolerance() -> None:
    signed = Signed(now=NOW - 301)
    assert reason(signed) == f"timestamp {NOW} is 301 s in the future, beyond the 300 s tolerance"


def test_future_timestamp_ok_at_tolerance() -> None:
    assert Signed(now=NOW - 300).verify() == NOW


def test_fractional_age_in_reason() -> None:
    assert "is 300.5 s old" in reason(Signed(now=NOW + 300.5))


def test_custom_tolerance() -> None:
    header = sign(BODY, SECRET, timestamp=NOW)
    assert verify(BODY, header, SECRET, now=NOW + 1000, tolerance=1000) == NOW
    with pytest.raises(SignatureError, match=r"older than the 10 s tolerance$"):
        verify(BODY, header, SECRET, now=NOW + 11, tolerance=10)


def test_now_defaults_to_wall_clock() -> None:
    header = sign(BODY, SECRET, timestamp=NOW)  # 2024: long stale by the real clock
    with pytest.raises(SignatureError, match=r"older than the 300 s tolerance$"):
        verify(BODY, header, SECRET)


def test_injected_clock_decides() -> None:
    ancient = replace(Signed(), timestamp=1_000, now=1_000)
    assert ancient.verify() == 1_000


def test_uppercase_hex_accepted() -> None:
    signed = Signed()
    t, v1 = signed.header.split(",")
    assert signed.verify(header=f"{t},{v1.upper().replace('V1=', 'v1=')}") == NOW


def test_whitespace_and_part_order_tolerated() -> None:
    signed = Signed()
    t, v1 = signed.header.split(",")
    assert signed.verify(header=f"  {v1} ,  {t} ") == NOW
    assert signed.verify(header=f"{t.replace('=', ' = ')},{v1},") == NOW


def test_unknown_parts_ignored() -> None:
    signed = Signed()
    assert signed.verify(header=f"{signed.header},v0=deadbeef") == NOW


def test_multiple_v1_entries_any_may_match() -> None:
    signed = Signed()
    good = signed.header.split(",v1=")[1]
    assert signed.verify(header=f"t={NOW},v1={'0' * 64},v1={good}") == NOW
    assert signed.verify(header=f"t={NOW},v1={good},v1={'0' * 64}") == NOW


def test_multiple_v1_entries_none_matching() -> None:
    assert reason(Signed(), header=f"t={NOW},v1={'0' * 64},v1={'1' * 64}").startswith("signature does not match")


def test_timestamp_is_part_of_signed_bytes() -> None:
    signed = Signed()
    forged = signed.header.replace(f"t={NOW}", f"t={NOW + 1}")
    assert reason(signed, header=forged).startswith("signature does not match")


@pytest.mark.parametrize("secrets", [[], "", [""]], ids=["empty-list", "empty-string", "list-of-empty"])
def test_no_secrets_configured(secrets: str | list[str]) -> None:
    assert reason(Signed(), secrets=secrets) == "no webhook secret configured"


def test_no_secrets_checked_before_header() -> None:
    with pytest.raises(SignatureError, match=r"^no webhook secret configured$"):
        verify(BODY, None, [], now=NOW)


def test_secret_strings_sign_and_verify_like_plain_ones() -> None:
    header = sign(BODY, SecretStr(SECRET), timestamp=NOW)
    assert header == sign(BODY, SECRET, timestamp=NOW)
    assert verify(BODY, header, SecretStr(SECRET), now=NOW) == NOW
    assert verify(BODY, header, [SecretStr(OTHER_SECRET), SECRET], now=NOW) == NOW
    with pytest.raises(SignatureError, match=r"^no webhook secret configured$"):
        verify(BODY, header, [SecretStr("")], now=NOW)
    with pytest.raises(SignatureError) as raised:
        verify(BODY, sign(BODY, OTHER_SECRET, timestamp=NOW), [SecretStr(SECRET)], now=NOW)
    assert SECRET not in str(raised.value)


def test_check_header_refuses_what_can_never_verify_without_the_body() -> None:
    now = 1_700_000_000
    good = sign(b"any body", "s", timestamp=now)
    assert check_header(good, "s", now=now) == now
    assert check_header(good, "another secret", now=now) == now  # Only the body can tell a wrong secret.
    for header, reason in [
        (None, "missing"),
        ("  ", "empty"),
        ("t=abc,v1=00", "malformed"),
        (sign(b"x", "s", timestamp=now - 301), "old"),
        (sign(b"x", "s", timestamp=now + 301), "future"),
    ]:
        with pytest.raises(SignatureError, match=reason):
            check_header(header, "s", now=now)
    with pytest.raises(SignatureError, match="no webhook secret"):
        check_header(good, [], now=now)
