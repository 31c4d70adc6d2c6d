"""The exceptions raised by the Layercode wire layer.

Why a tree of our own: the server maps these to HTTP statuses in one place (``SignatureError`` -> 401,
``PayloadError`` -> its ``status_code``) and nothing below ``server/`` needs to know HTTP. Third-party errors
(``json.JSONDecodeError``, ``pydantic.ValidationError``) are translated here at the boundary, ``from exc``.

Exception hierarchy::

    LayercodeError(Exception)
     ├── SignatureError          the ``layercode-signature`` header is missing, malformed, stale or wrong
     └── PayloadError            the webhook body cannot be used; ``status_code`` is a hint for the server
          ├── MalformedPayloadError  (400) not UTF-8, not JSON, not an object, nested too deeply, or not Unicode text
          └── InvalidPayloadError    (422) a JSON object that fails validation

Source: docs.layercode.com/api-reference/webhook-sse-api ("Webhook Verification"; samples answer 401 on a bad
signature), as summarised in ``/work/shared/layercode-protocol.md`` sections 1.2 and 1.3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

__all__ = [
    "InvalidPayloadError",
    "LayercodeError",
    "MalformedPayloadError",
    "PayloadError",
    "SignatureError",
]


class LayercodeError(Exception):
    """Base class of every error raised by ``layercode_agent.protocol``."""


class SignatureError(LayercodeError):
    """The request's ``layercode-signature`` header does not prove it came from Layercode.

    Attributes:
        reason: Why verification failed, precise and human readable, e.g. ``"missing layercode-signature header"``
            or ``"signature does not match (checked 2 secrets)"``. ``str(exc)`` is the same text.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PayloadError(LayercodeError):
    """The webhook body cannot be turned into an event.

    Attributes:
        message: What is wrong with the body; ``str(exc)`` is the same text.
        status_code: The HTTP status the server should answer with.
    """

    status_code: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedPayloadError(PayloadError):
    """The body is not UTF-8, not JSON, not an object, nested too deeply, or a string in it is not Unicode text."""

    status_code = 400


class InvalidPayloadError(PayloadError):
    """The body is a JSON object but fails validation.

    Attributes:
        problems: One ``"field: problem"`` string per validation error, e.g. ``"text: field required"``.
    """

    status_code = 422

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)

    @classmethod
    def from_validation_error(cls, exc: ValidationError, *, context: str) -> InvalidPayloadError:
        """Build the error from pydantic's, one ``"field: problem"`` per entry.

        Args:
            exc: The validation error to translate.
            context: What was being validated, prefixed to the message (e.g. ``"message event"``).

        Returns:
            An error whose message reads like ``"message event: text: field required"``.
        """
        problems = [_describe(error) for error in exc.errors(include_url=False, include_input=False)]
        return cls(f"{context}: {'; '.join(problems)}", problems=problems)


def _describe(error: Mapping[str, Any]) -> str:
    """Render one pydantic error entry as ``"field.path: problem"`` (or just the problem for whole-body errors)."""
    loc = _format_loc(error["loc"])
    msg: str = error["msg"]
    if error["type"] == "value_error" and "error" in error.get("ctx", {}):
        msg = str(error["ctx"]["error"])  # our own validators' text, without pydantic's "Value error, " prefix
    # pydantic capitalises ("Field required"); lower-case it so it reads mid-sentence, but keep acronyms ("URL ...").
    if msg[:1].isupper() and not msg[1:2].isupper():
        msg = msg[0].lower() + msg[1:]
    return f"{loc}: {msg}" if loc else msg


def _format_loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif parts:
            parts.append(f".{item}")
        else:
            parts.append(item)
    return "".join(parts)
