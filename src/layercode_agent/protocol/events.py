"""Inbound webhook bodies: what Layercode POSTs to the agent backend.

Why these models are tolerant: the protocol changed three times in 2025 ("pipelines" with upper-case ``MESSAGE``
types and only ``session_id``; "agents" with dotted types and ``conversation_id``; then ``data`` events and
``custom_metadata``) and still drifts, so every model ignores unknown fields, legacy type names are normalised, an
unknown ``type`` becomes an :class:`UnknownEvent` instead of an error, and both ``metadata`` and
``custom_metadata`` are read. Conversation state is keyed by ``conversation_id`` (stable across reconnects),
falling back to ``session_id`` (changes on every reconnect) for legacy bodies.

``parse_event`` reads ``type`` first and validates against that one model: no trial-and-error union validation on
the hot path.

Source: docs.layercode.com/api-reference/webhook-sse-api (current payloads, checked late 2025) and the
``interruption_context`` type from layercodedev's Next.js example backend, summarised in
``/work/shared/layercode-protocol.md`` sections 0, 1.3, 1.4 and 2.4.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .bodies import load_json_object
from .errors import InvalidPayloadError

__all__ = [
    "DataEvent",
    "InboundEvent",
    "InterruptionContext",
    "MessageEvent",
    "SessionEndEvent",
    "SessionStartEvent",
    "SessionUpdateEvent",
    "TranscriptEntry",
    "UnknownEvent",
    "WebhookEvent",
    "parse_event",
]


class InterruptionContext(BaseModel):
    """What the user heard of the previous assistant turn before barging in.

    Sent on the ``message`` that follows an interruption; only the immediately previous assistant turn is reported.
    """

    model_config = ConfigDict(extra="ignore")

    previous_turn_interrupted: bool = False
    words_heard: int | None = None
    text_heard: str | None = None
    """The part of the assistant reply that was actually spoken."""
    assistant_turn_id: str | None = None
    """The ``turn_id`` of the assistant reply that was cut off."""


class TranscriptEntry(BaseModel):
    """One line of the ``session.end`` transcript."""

    model_config = ConfigDict(extra="ignore")

    role: str
    """``"user"`` or ``"assistant"``."""
    text: str = ""
    timestamp: int | float | str | None = None
    """Unix milliseconds in the docs; ISO strings are tolerated too."""


class WebhookEvent(BaseModel):
    """Fields every webhook body may carry."""

    model_config = ConfigDict(extra="ignore")

    # Subclasses narrow ``type`` to their Literal tag. Pyright calls that an incompatible override of a mutable
    # attribute; it is safe because each tag is validated and nobody assigns ``type``, hence the ignores below.
    type: str
    session_id: str | None = None
    """Connection id; changes on every reconnect."""
    conversation_id: str | None = None
    """Stable across reconnects; absent from legacy ("pipelines") bodies."""
    turn_id: str | None = None
    """Echo this in every response event."""
    custom_metadata: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None

    @model_validator(mode="after")
    def _require_conversation_key(self) -> Self:
        if not self.conversation_id and not self.session_id:
            raise ValueError("either conversation_id or session_id is required")
        return self

    @property
    def conversation_key(self) -> str:
        """The id to key conversation state by: ``conversation_id``, else ``session_id`` (legacy bodies)."""
        key = self.conversation_id or self.session_id
        assert key, "validated in _require_conversation_key"
        return key

    @property
    def all_metadata(self) -> dict[str, Any]:
        """``metadata`` merged with ``custom_metadata``; ``custom_metadata`` wins on conflicts."""
        return {**(self.metadata or {}), **(self.custom_metadata or {})}


class MessageEvent(WebhookEvent):
    """``message``: the user finished a turn (spoken or typed); answer with an SSE stream."""

    type: Literal["message"] = "message"  # pyright: ignore[reportIncompatibleVariableOverride]
    text: str
    interruption_context: InterruptionContext | None = None


class SessionStartEvent(WebhookEvent):
    """``session.start``: a session opened; answer with an SSE stream (a welcome, or just ``response.end``)."""

    type: Literal["session.start"] = "session.start"  # pyright: ignore[reportIncompatibleVariableOverride]
    text: str | None = None


class SessionEndEvent(WebhookEvent):
    """``session.end``: the session finished; answer with a plain 2xx."""

    type: Literal["session.end"] = "session.end"  # pyright: ignore[reportIncompatibleVariableOverride]
    agent_id: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration: float | None = None
    """Milliseconds."""
    transcription_duration_seconds: float | None = None
    tts_duration_seconds: float | None = None
    latency: float | None = None
    ip_address: str | None = None
    country_code: str | None = None
    recording_status: str | None = None
    """The organisation setting here: ``"enabled"`` or ``"disabled"``."""
    transcript: list[TranscriptEntry] = Field(default_factory=list)

    @field_validator("transcript", mode="before")
    @classmethod
    def _null_transcript(cls, value: Any) -> Any:
        return [] if value is None else value


class SessionUpdateEvent(WebhookEvent):
    """``session.update``: asynchronous session data (a processed recording) is ready; answer with a plain 2xx."""

    type: Literal["session.update"] = "session.update"  # pyright: ignore[reportIncompatibleVariableOverride]
    recording_status: str | None = None
    """``"completed"`` or ``"failed"``."""
    recording_url: str | None = None
    recording_duration: float | None = None
    """Seconds."""
    error_message: str | None = None


class DataEvent(WebhookEvent):
    """``data``: the client sent structured data; answer with plain JSON (``response.data``), not SSE."""

    type: Literal["data"] = "data"  # pyright: ignore[reportIncompatibleVariableOverride]
    data: dict[str, Any] | list[Any] | str | int | float | bool | None = None


class UnknownEvent(WebhookEvent):
    """A ``type`` this version does not know; the whole decoded body is kept in ``body``."""

    body: dict[str, Any] = Field(default_factory=dict)


InboundEvent = MessageEvent | SessionStartEvent | SessionEndEvent | SessionUpdateEvent | DataEvent | UnknownEvent
"""Every event :func:`parse_event` can return."""

_MODELS: Final[dict[str, type[MessageEvent | SessionStartEvent | SessionEndEvent | SessionUpdateEvent | DataEvent]]] = {
    "message": MessageEvent,
    "session.start": SessionStartEvent,
    "session.end": SessionEndEvent,
    "session.update": SessionUpdateEvent,
    "data": DataEvent,
}

# Early-2025 "pipelines" bodies used upper-case types.
_LEGACY_TYPES: Final = {
    "MESSAGE": "message",
    "SESSION_START": "session.start",
    "SESSION_END": "session.end",
    "SESSION_UPDATE": "session.update",
    "DATA": "data",
}


def parse_event(raw: bytes | str) -> InboundEvent:
    """Decode and validate one webhook body.

    Args:
        raw: The request body (verify its signature first, on these same bytes).

    Returns:
        The event model for the body's ``type``; :class:`UnknownEvent` for a type this version does not know.

    Raises:
        MalformedPayloadError: The body is not UTF-8, not JSON, not a JSON object, nested too deeply, or holds text
            that is not Unicode (a lone surrogate, in any field); see :func:`load_json_object` (status 400).
        InvalidPayloadError: The object has no string ``type`` or fails validation (status 422).
    """
    data = load_json_object(raw)

    event_type = data.get("type")
    if event_type is None:
        raise InvalidPayloadError("type: field required")
    if not isinstance(event_type, str):
        raise InvalidPayloadError("type: must be a string")
    normalised = _LEGACY_TYPES.get(event_type, event_type)
    if normalised != event_type:
        data = {**data, "type": normalised}

    model = _MODELS.get(normalised)
    try:
        if model is None:
            return UnknownEvent.model_validate({**data, "body": data})
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidPayloadError.from_validation_error(exc, context=f"{normalised} event") from exc
