"""Sign and verify the ``layercode-signature`` header of Layercode webhooks.

Why this exists: anyone who learns the webhook URL could otherwise make the agent speak or read its history.
Layercode signs every POST with an HMAC of the raw body; we check it before parsing anything. The check is
framework-free (``verify(body, header, secrets)``, as standard-webhooks does) and, unlike most samples, takes the
clock and tolerance as parameters so tests need no time travel, and accepts several secrets so a secret can be
rotated without downtime. Secrets may be plain strings or pydantic ``SecretStr``; they are unwrapped only where the
HMAC is computed, so a secret travelling through the app never shows in a ``repr``, a log line or a traceback.

Algorithm (docs "Webhook Verification", confirmed by ``@layercode/node-server-sdk`` 1.2.1 ``verifySignature``):
header ``t=<unix seconds>,v1=<hex HMAC-SHA256>``; signed bytes are ``f"{t}."`` + the exact raw body; the key is
the secret string as-is (no base64); reject when ``|now - t|`` exceeds the tolerance (SDK default 300 s).
Always HMAC the raw bytes: re-serialising the JSON in Python changes the bytes and breaks the signature.

Source: docs.layercode.com/api-reference/webhook-sse-api, summarised in ``/work/shared/layercode-protocol.md`` §1.2.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Sequence
from typing import Final, NoReturn, TypeAlias

from pydantic import SecretStr

from .errors import SignatureError

__all__ = ["DEFAULT_TOLERANCE", "SIGNATURE_HEADER", "check_header", "sign", "verify"]

SIGNATURE_HEADER: Final = "layercode-signature"
"""Name of the HTTP header carrying the signature (lower case; HTTP header names are case-insensitive)."""

DEFAULT_TOLERANCE: Final = 300
"""Seconds a signature timestamp may differ from our clock, either way (the Node SDK's default)."""

_EXPECTED: Final = "expected 't=<unix seconds>,v1=<hex hmac>'"
# Unix seconds fit in 15 digits until the year 31 million; the bound also keeps int() away from huge inputs.
_SECONDS_RE: Final = re.compile(r"[0-9]{1,15}")
_HEX_RE: Final = re.compile(r"[0-9a-fA-F]+")

_Secret: TypeAlias = str | SecretStr


def sign(body: bytes, secret: _Secret, *, timestamp: int | None = None) -> str:
    """Compute the ``layercode-signature`` header value Layercode would send for ``body``.

    Args:
        body: The exact request body bytes.
        secret: The agent's webhook secret (a string or a ``SecretStr``), used as-is as the HMAC key.
        timestamp: Unix seconds to sign with; defaults to now.

    Returns:
        ``"t=<timestamp>,v1=<lower-case hex HMAC-SHA256>"``.
    """
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return f"t={ts},v1={_digest(secret, ts, body)}"


def verify(
    body: bytes,
    header: str | None,
    secrets: _Secret | Sequence[_Secret],
    *,
    now: float | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> int:
    """Check that ``body`` was signed by Layercode with one of ``secrets``, recently.

    The header parser tolerates whitespace around parts, any part order, unknown parts, upper- or lower-case hex
    and several ``v1=`` entries (any of which may match). Digests are compared with ``hmac.compare_digest``.

    Args:
        body: The exact raw request body bytes, as received.
        header: The ``layercode-signature`` header value, or ``None`` when the request had none.
        secrets: The webhook secret, or several during a rotation, as strings or ``SecretStr``; verification
            succeeds if any matches. Empty ones are ignored.
        now: The current Unix time in seconds; defaults to ``time.time()``.
        tolerance: Maximum seconds between the signed timestamp and ``now``, in either direction.

    Returns:
        The verified timestamp (Unix seconds) from the header.

    Raises:
        SignatureError: No secret is configured, or the header is missing, malformed, outside the tolerance or
            does not match; ``reason`` says which.
    """
    keys, ts, signatures = _checked_header(header, secrets, now, tolerance)
    timestamp = int(ts)
    for key in keys:
        expected = _digest(key, ts, body)
        for candidate in signatures:
            if hmac.compare_digest(expected, candidate):
                return timestamp
    noun = "secret" if len(keys) == 1 else "secrets"
    raise SignatureError(f"signature does not match (checked {len(keys)} {noun})")


def check_header(
    header: str | None,
    secrets: _Secret | Sequence[_Secret],
    *,
    now: float | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> int:
    """Check what `verify` checks without the body: a secret is configured, the header is there, well formed, recent.

    Call it before reading the body, so a request that can never verify is refused without reading it;
    then `verify` the body.

    Returns:
        The header's timestamp (Unix seconds).

    Raises:
        SignatureError: As `verify` does, except "does not match".
    """
    _, ts, _ = _checked_header(header, secrets, now, tolerance)
    return int(ts)


def _checked_header(
    header: str | None, secrets: _Secret | Sequence[_Secret], now: float | None, tolerance: int
) -> tuple[list[_Secret], str, list[str]]:
    keys = [secrets] if isinstance(secrets, str | SecretStr) else list(secrets)
    keys = [key for key in keys if len(key)]
    if not keys:
        raise SignatureError("no webhook secret configured")
    if header is None:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    if not header.strip():
        raise SignatureError(f"empty {SIGNATURE_HEADER} header")
    ts, signatures = _parse(header)
    timestamp = int(ts)
    age = (time.time() if now is None else now) - timestamp
    if age > tolerance:
        raise SignatureError(f"timestamp {timestamp} is {_seconds(age)} s old, older than the {tolerance} s tolerance")
    if -age > tolerance:
        raise SignatureError(
            f"timestamp {timestamp} is {_seconds(-age)} s in the future, beyond the {tolerance} s tolerance"
        )
    return keys, ts, signatures


def _digest(secret: _Secret, ts: str, body: bytes) -> str:
    # The one place a secret is unwrapped.
    key = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return hmac.new(key.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()


def _parse(header: str) -> tuple[str, list[str]]:
    """Split a header value into its timestamp string and lower-cased ``v1`` signatures."""
    ts: str | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            if key:
                _malformed(f"part {key[:20]!r} is not 'key=value'")
            continue  # tolerate empty parts, e.g. a trailing comma
        if key == "t":
            if ts is not None:
                _malformed("more than one t= part")
            if not _SECONDS_RE.fullmatch(value):
                _malformed(f"t={value[:20]!r} is not an integer number of seconds")
            ts = value
        elif key == "v1":
            if not _HEX_RE.fullmatch(value):
                _malformed(f"v1={value[:20]!r} is not hex")
            signatures.append(value.lower())
        # Other keys (future schemes such as v2) are ignored, as Stripe-style headers allow.
    if ts is None:
        _malformed("no t= part")
    if not signatures:
        _malformed("no v1= part")
    return ts, signatures


def _malformed(detail: str) -> NoReturn:
    raise SignatureError(f"malformed {SIGNATURE_HEADER} header: {_EXPECTED} ({detail})")


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")
