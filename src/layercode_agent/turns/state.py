"""One turn's state: where its task is (one `Phase`), what its response sent, and its events' queue."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncGenerator, Callable
from enum import Enum

from pydantic_ai.usage import RunUsage

from ..history import COMPLETED
from ..protocol import EndResponse, OutboundEvent, TTSResponse
from .timing import Stage, TurnObserver, TurnTiming

__all__ = ["Phase", "Turn"]


class Phase(Enum):
    """Where a turn's task is. It only moves forward."""

    BEGINNING = "beginning"
    """Its first messages are being stored; never cut short."""
    ANSWERING = "answering"
    """The model runs: the only phase a stop cancels the task in."""
    CLOSING = "closing"
    """Its reply is being stored; never cut short."""
    FINISHED = "finished"
    """The task is done; the turn is reported once its response (if one streams) is done too."""
    REPORTED = "reported"


class Turn:
    """A turn being answered: its task produces events, the HTTP response reads them."""

    def __init__(
        self,
        conversation_id: str,
        turn_id: str,
        timing: TurnTiming | None = None,
        *,
        observer: TurnObserver | None = None,
        report: Callable[[Turn], None] | None = None,
    ) -> None:
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self.observer = observer or TurnObserver()
        self._report = report
        self.queue: asyncio.Queue[OutboundEvent | None] = asyncio.Queue()
        self.sent: list[str] = []
        """The text the response has passed on to Layercode."""
        self.phase = Phase.BEGINNING
        self.stop_requested = False
        """The caller left or a newer turn came: the turn closes with what was sent."""
        self.finished = asyncio.Event()
        """Set when the task is done (`Phase.FINISHED`), for whoever waits for it to close."""
        self.reading = False
        """Whether the HTTP response is reading the turn's events (the other party a report waits for)."""
        self.task: asyncio.Task[None] | None = None
        self.outcome = COMPLETED
        self.llm_error: str | None = None
        self.timing = timing or TurnTiming()
        self.usage: RunUsage | None = None
        """The model run's usage so far (pydantic-ai keeps it current), once the run started."""

    @property
    def answering(self) -> bool:
        """Whether the model runs (the task may be cancelled)."""
        return self.phase is Phase.ANSWERING

    def enter(self, phase: Phase) -> None:
        """Move the task on to `phase`."""
        self.phase = phase
        if phase is Phase.FINISHED:
            self.finished.set()

    def stop(self) -> None:
        """Stop the turn (caller gone, or a newer turn arrived); it closes with what was sent."""
        self.stop_requested = True
        if self.phase is Phase.ANSWERING and self.task is not None:
            self.task.cancel()

    def spent(self) -> RunUsage | None:
        """What the model run used before it was cut short (`None` if it never started)."""
        return copy.copy(self.usage) if self.usage is not None else None

    def drop_queued(self) -> None:
        """Forget the events that never reached the caller."""
        while not self.queue.empty():
            self.queue.get_nowait()

    async def events(self) -> AsyncGenerator[OutboundEvent]:
        """What to stream to Layercode, ending with `response.end`; stops the turn if the reader goes away."""
        observer = self.observer
        self.reading = True
        observer.stream_opened()
        queue = self.queue
        held: OutboundEvent | None = None
        ended = False
        try:
            while not ended:
                event = held if held is not None else await queue.get()
                held = None
                if event is None:
                    break
                if isinstance(event, TTSResponse) and not queue.empty():
                    # Words that queued up while the last chunk was being written leave together:
                    # one write instead of several, and no word waits for another.
                    content = event.content
                    while not queue.empty():
                        following = queue.get_nowait()
                        if following is None:
                            ended = True
                            break
                        if not isinstance(following, TTSResponse):
                            held = following
                            break
                        content += following.content
                    event = TTSResponse(content=content, turn_id=event.turn_id)
                if isinstance(event, TTSResponse):
                    if not self.sent:
                        self.timing.mark(Stage.FIRST_TTS)
                    self.sent.append(event.content)
                yield event
            yield EndResponse(turn_id=self.turn_id)
            self.timing.mark(Stage.RESPONSE_END)
        except (asyncio.CancelledError, GeneratorExit):
            self.stop()
            raise
        finally:
            self.reading = False
            observer.stream_closed()
            self.maybe_report()

    def maybe_report(self) -> None:
        """Report the turn once both its task and its response (if one is streaming) are done."""
        if self.phase is Phase.FINISHED and not self.reading:
            self.phase = Phase.REPORTED
            if self._report is not None:
                self._report(self)
