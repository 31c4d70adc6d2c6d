"""When each stage of a turn happened, and what the turn came to: for metrics, traces and the log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["Stage", "TurnObserver", "TurnReport", "TurnTiming"]


class Stage(StrEnum):
    """The stages of a turn, in the order they happen; the values name them in metrics, spans and logs."""

    SIGNATURE_VERIFIED = "signature_verified"
    HISTORY_LOADED = "history_loaded"
    """The log read and the caller's words stored."""
    LLM_REQUEST = "llm_request"
    LLM_FIRST_TOKEN = "llm_first_token"
    FIRST_TTS = "first_tts"
    """The first `response.tts` handed to the HTTP response."""
    LLM_LAST_TOKEN = "llm_last_token"
    HISTORY_SAVED = "history_saved"
    """The reply stored."""
    RESPONSE_END = "response_end"
    """`response.end` written."""


@dataclass
class TurnTiming:
    """Milliseconds from the moment the webhook was received to each `Stage` of its turn.

    A turn cut short has only the stages it reached. `stages` is keyed by the stages' plain names.
    """

    started: float = field(default_factory=time.perf_counter)
    """`time.perf_counter()` when the webhook arrived."""
    wall: float = field(default_factory=time.time)
    """The same moment as Unix time, for spans."""
    stages: dict[str, float] = field(default_factory=dict[str, float])

    def mark(self, stage: Stage, at: float | None = None) -> None:
        """Record a stage once (the first time it happens), now or at the `perf_counter()` value `at`."""
        name = stage.value
        if name not in self.stages:
            self.stages[name] = self._ms(at)

    def restate(self, stage: Stage, at: float) -> None:
        """Move a recorded stage to the `perf_counter()` value `at`, once it is known the stage happened then."""
        if stage.value in self.stages:
            self.stages[stage.value] = self._ms(at)

    def _ms(self, at: float | None) -> float:
        return round(((at if at is not None else time.perf_counter()) - self.started) * 1000, 3)


@dataclass(frozen=True)
class TurnReport:
    """What happened in one turn, for metrics, traces and the per-turn log line."""

    conversation_id: str
    turn_id: str
    outcome: str
    """`completed`, `interrupted`, `failed` or `duplicate`."""
    stages: dict[str, float]
    """Milliseconds since the webhook arrived, per stage (see `TurnTiming`)."""
    received_at: float
    """Unix time the webhook arrived."""
    llm_error: str | None = None
    """The exception class when the model failed."""


class TurnObserver:
    """Hooks for metrics and tracing; the default does nothing. Every hook must be fast and never raise."""

    def stream_opened(self) -> None:
        """A turn's response started streaming."""

    def stream_closed(self) -> None:
        """A turn's response finished or was aborted."""

    def turn_finished(self, report: TurnReport) -> None:
        """A turn ended; called once per turn, after `response.end` was written if the caller was still there."""

    def store_operation(self, operation: str, seconds: float) -> None:
        """A store round of the turn record (`begin`, `close`, `read`) took `seconds`."""
