"""From raw timings to the figures the issue asks for: one `RunFigures` per run, medians per level.

Overhead, per turn, in milliseconds (`time.monotonic()` in both processes, so the clocks agree):

- `overhead` = first `response.tts` received - webhook sent - the fake's nominal time to first token (the issue's
  definition: what the backend adds to the LLM's own 200 ms);
- `llm_overhead` = first `response.tts` received - webhook sent - the fake's *actual* time to first token (first
  token written - request's first byte received, as the fake recorded them). It removes the fake's own timer
  lateness (about half a millisecond) and equals `to_llm` + `from_llm`:
- `to_llm` = the LLM request's first byte received - webhook sent (signature, parsing, store reads and writes,
  agent set-up, the OpenAI request);
- `from_llm` = first `response.tts` received - first token written by the fake (the stream's way back out).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .load import Conversation

__all__ = [
    "FLOOR_RATIOS",
    "HistoryGrowth",
    "LevelResult",
    "RunFigures",
    "Suite",
    "floor_ratios",
    "history_growth",
    "percentile",
    "run_figures",
]

FLOOR_RATIOS = ("overhead_p50", "overhead_p99", "to_llm_p50", "cpu_ms_per_turn", "turns_per_s")
"""The figures every table also shows as a ratio to the floor's (`bench.floor`, measured in the same bench)."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0-100) with linear interpolation between closest ranks; `None` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class RunFigures:
    """One measured run of one level."""

    turns: int = 0
    """Turns sent."""
    errors: int = 0
    """Turns without a complete, correct streamed answer (HTTP error, timeout, no response.end, wrong text)."""
    defects: int = 0
    """Conversations whose stored history is not exactly what was said and streamed."""
    turns_per_s: float | None = None
    overhead_p50: float | None = None
    overhead_p90: float | None = None
    overhead_p99: float | None = None
    llm_overhead_p50: float | None = None
    llm_overhead_p90: float | None = None
    llm_overhead_p99: float | None = None
    to_llm_p50: float | None = None
    from_llm_p50: float | None = None
    llm_lag_p99: float | None = None
    """How late the fake's first tokens were against their nominal time (its own timer lateness), p99."""
    turn_p50: float | None = None
    """Webhook sent to `response.end` received."""
    cpu_ms_per_turn: float | None = None
    """Server CPU (every server process) over the run, divided by the turns sent."""
    store_cpu_ms_per_turn: float | None = None
    """redis-server's CPU per turn (Redis runs on the load generator's core); `None` for the other stores."""
    rss_mib: float | None = None
    """Peak resident memory of the server's processes so far (VmHWM, summed)."""
    load_core_pct: float | None = None
    """How busy the load generator's core(s) were: load generator + fake LLM (+ Redis) CPU / wall time."""
    client_cpu_pct: float | None = None
    fake_cpu_pct: float | None = None
    other_cpu_pct: float | None = None
    """CPU used by processes outside the bench during the run (% of one core): others' load disturbs the figures."""
    wall_s: float | None = None
    error_samples: list[str] = field(default_factory=list[str])
    defect_samples: list[str] = field(default_factory=list[str])


@dataclass
class CPUWindow:
    """CPU seconds used during a run, per party, and its wall-clock length."""

    server: float
    fake: float
    client: float
    store: float | None
    machine: float
    """Every process on the machine, the bench's own included."""
    wall: float
    load_cores: int


def _ms(seconds: float) -> float:
    return seconds * 1000


HISTORY_SPAN = 5
"""Turns whose webhook → LLM request times make each end of `HistoryGrowth`."""


@dataclass
class HistoryGrowth:
    """Webhook → LLM request through one long conversation: its first turns against its last ones."""

    exchanges: int
    """Earlier exchanges before the last turns: they have `exchanges` to `exchanges + HISTORY_SPAN - 1`."""
    first_p50: float | None
    """The median over the first `HISTORY_SPAN` turns (0 to 4 earlier exchanges)."""
    last_p50: float | None
    """The median over the last `HISTORY_SPAN` turns."""
    to_llm: list[float | None]
    """Every turn's webhook → LLM request, in order (`None`: no figure: an error, or no request seen)."""
    errors: int

    @property
    def growth(self) -> float | None:
        """How much longer the last turns wait for their request than the first ones."""
        return None if self.first_p50 is None or self.last_p50 is None else self.last_p50 - self.first_p50


def history_growth(
    conversation: Conversation, llm_timings: dict[str, tuple[float, float | None]], exchanges: int
) -> HistoryGrowth:
    """The figures of one conversation of `exchanges + HISTORY_SPAN` turns (see `HistoryGrowth`)."""
    to_llm: list[float | None] = []
    for turn in conversation.turns:
        received, _ = llm_timings.get(turn.key, (None, None))
        to_llm.append(_ms(received - turn.sent) if received is not None and turn.error is None else None)
    first = [value for value in to_llm[:HISTORY_SPAN] if value is not None]
    last = [value for value in to_llm[exchanges : exchanges + HISTORY_SPAN] if value is not None]
    errors = sum(1 for turn in conversation.turns if turn.error is not None)
    return HistoryGrowth(exchanges, percentile(first, 50), percentile(last, 50), to_llm, errors)


def run_figures(
    conversations: list[Conversation],
    llm_timings: dict[str, tuple[float, float | None]],
    *,
    ttft_ms: float,
    cpu: CPUWindow,
    rss_mib: float,
    defects: list[str],
) -> RunFigures:
    """The figures of one run.

    Args:
        conversations: What was sent and received.
        llm_timings: The fake's `(request received, first token sent)` per request key.
        ttft_ms: The fake's nominal time to first token.
        cpu: CPU used during the run.
        rss_mib: The server's peak RSS after the run.
        defects: The history check's findings.
    """
    turns = [turn for conversation in conversations for turn in conversation.turns]
    good = [turn for turn in turns if turn.error is None and turn.first_tts is not None and turn.ended is not None]
    bad = [turn for turn in turns if not (turn.error is None and turn.first_tts is not None and turn.ended is not None)]
    overhead: list[float] = []
    llm_overhead: list[float] = []
    to_llm: list[float] = []
    from_llm: list[float] = []
    lag: list[float] = []
    turn_ms: list[float] = []
    for turn in good:
        assert turn.first_tts is not None and turn.ended is not None
        first = _ms(turn.first_tts - turn.sent)
        overhead.append(first - ttft_ms)
        turn_ms.append(_ms(turn.ended - turn.sent))
        received, first_token = llm_timings.get(turn.key, (None, None))
        if received is not None and first_token is not None:
            llm_overhead.append(first - _ms(first_token - received))
            to_llm.append(_ms(received - turn.sent))
            from_llm.append(_ms(turn.first_tts - first_token))
            lag.append(_ms(first_token - received) - ttft_ms)
    return RunFigures(
        turns=len(turns),
        errors=len(turns) - len(good),
        defects=len(defects),
        turns_per_s=_steady_rate(conversations),
        overhead_p50=percentile(overhead, 50),
        overhead_p90=percentile(overhead, 90),
        overhead_p99=percentile(overhead, 99),
        llm_overhead_p50=percentile(llm_overhead, 50),
        llm_overhead_p90=percentile(llm_overhead, 90),
        llm_overhead_p99=percentile(llm_overhead, 99),
        to_llm_p50=percentile(to_llm, 50),
        from_llm_p50=percentile(from_llm, 50),
        llm_lag_p99=percentile(lag, 99),
        turn_p50=percentile(turn_ms, 50),
        cpu_ms_per_turn=_ms(cpu.server) / len(turns) if turns else None,
        store_cpu_ms_per_turn=_ms(cpu.store) / len(turns) if turns and cpu.store is not None else None,
        rss_mib=rss_mib,
        load_core_pct=100 * (cpu.client + cpu.fake + (cpu.store or 0.0)) / cpu.wall / cpu.load_cores,
        client_cpu_pct=100 * cpu.client / cpu.wall,
        fake_cpu_pct=100 * cpu.fake / cpu.wall,
        other_cpu_pct=max(
            0.0, 100 * (cpu.machine - cpu.server - cpu.fake - cpu.client - (cpu.store or 0.0)) / cpu.wall
        ),
        wall_s=cpu.wall,
        error_samples=[f"{turn.turn_id}: {turn.error or 'no response.tts'}" for turn in bad][:5],
        defect_samples=defects[:5],
    )


def _steady_rate(conversations: list[Conversation]) -> float | None:
    """Turns per second while every conversation was in flight.

    The window runs from the last conversation's first webhook to the first conversation's last `response.end`,
    so the ramp-up and the tail do not dilute the rate; it is the whole level when that window is too short.
    """
    started = [c.turns[0].sent for c in conversations if c.turns]
    ended = [turn.ended for c in conversations for turn in c.turns if turn.ended is not None]
    if not started or not ended:
        return None
    last_ends = [max((t.ended for t in c.turns if t.ended is not None), default=None) for c in conversations]
    window_start = max(started)
    window_end = min((end for end in last_ends if end is not None), default=window_start)
    if window_end - window_start < 0.5:
        window_start, window_end = min(started), max(ended)
    inside = sum(1 for end in ended if window_start <= end <= window_end)
    return inside / (window_end - window_start) if window_end > window_start else None


@dataclass
class LevelResult:
    """Every run of one concurrency level, and their medians."""

    concurrency: int
    runs: list[RunFigures] = field(default_factory=list[RunFigures])

    @property
    def summary(self) -> RunFigures:
        """Each figure's median over the runs; errors and defects are summed, samples concatenated."""
        summary = RunFigures()
        for spec in fields(RunFigures):
            values = [getattr(run, spec.name) for run in self.runs]
            if spec.name in ("turns", "errors", "defects"):
                setattr(summary, spec.name, sum(values))
            elif spec.name.endswith("_samples"):
                setattr(summary, spec.name, [sample for value in values for sample in value][:5])
            else:
                present = [value for value in values if value is not None]
                setattr(summary, spec.name, statistics.median(present) if present else None)
        return summary


def ratio(value: float | None, floor: float | None) -> float | None:
    """`value / floor`, `None` when either is missing or the floor's is not positive."""
    if value is None or floor is None or floor <= 0:
        return None
    return value / floor


def floor_ratios(figures: RunFigures, floor: RunFigures | None) -> dict[str, float | None]:
    """Each of `FLOOR_RATIOS` as the project's figure divided by the floor's (empty without a floor)."""
    if floor is None:
        return {}
    return {name: ratio(getattr(figures, name), getattr(floor, name)) for name in FLOOR_RATIOS}


@dataclass
class Suite:
    """One store under one server configuration (or the floor): every level measured against one backend."""

    store: str
    store_url: str
    workers: int
    pinning: str
    levels: list[LevelResult] = field(default_factory=list[LevelResult])
    notes: list[str] = field(default_factory=list[str])
    history: HistoryGrowth | None = None

    @property
    def is_floor(self) -> bool:
        return self.store == "floor"

    @property
    def title(self) -> str:
        if self.is_floor:
            return "floor (framework-free aiohttp backend, memory)"
        workers = "1 worker" if self.workers == 1 else f"{self.workers} workers"
        return f"{self.store} ({workers})"

    def level(self, concurrency: int) -> LevelResult | None:
        """The level measured at `concurrency`, if any."""
        return next((level for level in self.levels if level.concurrency == concurrency), None)

    def as_json(self, floor: Suite | None = None) -> dict[str, Any]:
        """Every run and median; with `floor`, each level's `vs_floor` ratios too."""
        levels: list[dict[str, Any]] = []
        for level in self.levels:
            summary = level.summary
            entry: dict[str, Any] = {"concurrency": level.concurrency, "median": asdict(summary)}
            if floor is not None:
                base = floor.level(level.concurrency)
                entry["vs_floor"] = floor_ratios(summary, base.summary if base else None)
            entry["runs"] = [asdict(r) for r in level.runs]
            levels.append(entry)
        return {
            "store": self.store,
            "store_url": self.store_url,
            "workers": self.workers,
            "pinning": self.pinning,
            "notes": self.notes,
            "levels": levels,
            "history": asdict(self.history) if self.history is not None else None,
        }
