"""Per-turn Prometheus metrics and OpenTelemetry spans, fed by the turn runner's observer hooks.

Latency is the product on a phone line, so the numbers that matter are per stage: how long after the
webhook arrived the signature was checked, the history loaded, the LLM asked, its first token seen,
the first words handed to Layercode, and so on (the stages of `TurnTiming`). Every hook is cheap
(a few histogram and counter updates, microseconds) and never raises; nothing runs per token.

Spans are built after the fact: when a turn ends, one `turn` span starting when its webhook arrived,
with one child span per stage interval, all with explicit start and end times. Without a tracer (no
`LOGFIRE_TOKEN`, no OTLP endpoint) no tracing work is done at all.

Under `serve --workers N` each worker writes its numbers to `PROMETHEUS_MULTIPROC_DIR` and a scrape
of any worker adds them all up (`exposition`); see the prometheus_client docs, "Multiprocess Mode"
(prometheus.github.io/client_python/multiprocess, Nov 2025).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from opentelemetry.trace import Status, StatusCode, Tracer, set_span_in_context
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .turns import TurnObserver, TurnReport

__all__ = [
    "LATENCY_BUCKETS",
    "OUTCOMES",
    "PREFIX",
    "STAGES",
    "STORE_BUCKETS",
    "STORE_OPERATIONS",
    "MetricsObserver",
    "exposition",
    "first_word_overhead",
    "forget_process",
]

logger = logging.getLogger("layercode_agent.observability")

PREFIX = "layercode_agent_"
"""Every metric's name starts with this."""
STAGES = (
    "signature_verified",
    "history_loaded",
    "llm_request",
    "llm_first_token",
    "first_tts",
    "llm_last_token",
    "history_saved",
    "response_end",
)
"""The stages of a turn (see `TurnTiming`), in the order they usually happen."""
OUTCOMES = ("completed", "interrupted", "failed", "duplicate")
STORE_OPERATIONS = ("begin", "close", "read")
LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75),
    *(1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
)
"""Seconds, 1 ms to 30 s: fine where a caller notices (tens to hundreds of ms), coarse beyond."""
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds, 0.1 ms to 5 s: a local SQLite write takes well under a millisecond, Redis a round trip."""


def first_word_overhead(stages: dict[str, float]) -> float | None:
    """The milliseconds of the first word's delay that were this backend's own, not the LLM's.

    That is `llm_request` (from the webhook arriving to the LLM request being sent: signature,
    parsing, the delivery check, and unless the request sent early was the one the model took,
    the history and the agent's set-up) plus `first_tts - llm_first_token` (from the LLM's first token to the first
    `response.tts` handed to the HTTP response: cleaning and queueing), which equals `first_tts`
    minus the LLM's own time to first token. `None` when the turn has no such stages, or when the
    first words were not the LLM's (a slow-LLM filler spoken before its first token).
    """
    request = stages.get("llm_request")
    first_token = stages.get("llm_first_token")
    first_tts = stages.get("first_tts")
    if request is None or first_token is None or first_tts is None or first_tts < first_token:
        return None
    return request + (first_tts - first_token)


@dataclass(frozen=True)
class _Instruments:
    """The Prometheus metrics of one registry, with the children of the known label values resolved once."""

    stage: Histogram
    stages: dict[str, Histogram]
    overhead: Histogram
    turns: Counter
    outcomes: dict[str, Counter]
    active_streams: Gauge
    llm_errors: Counter
    store: Histogram
    operations: dict[str, Histogram]

    @classmethod
    def create(cls, registry: CollectorRegistry) -> _Instruments:
        stage = Histogram(
            f"{PREFIX}turn_stage_seconds",
            "Seconds from the webhook arriving to each stage of a turn.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        turns = Counter(f"{PREFIX}turns", "Message turns ended, by outcome.", ["outcome"], registry=registry)
        store = Histogram(
            f"{PREFIX}store_operation_seconds",
            "Seconds one store round of the turn record took (begin, close, read).",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        return cls(
            stage=stage,
            stages={name: stage.labels(name) for name in STAGES},
            overhead=Histogram(
                f"{PREFIX}first_word_overhead_seconds",
                "Seconds of the first word's delay spent in this backend rather than waiting for the LLM: "
                "llm_request + (first_tts - llm_first_token).",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            turns=turns,
            outcomes={name: turns.labels(name) for name in OUTCOMES},
            # livesum: under several workers, the sum over the workers still alive.
            active_streams=Gauge(
                f"{PREFIX}active_streams",
                "Turn responses streaming now.",
                multiprocess_mode="livesum",
                registry=registry,
            ),
            llm_errors=Counter(
                f"{PREFIX}llm_errors", "LLM failures inside turns, by exception class.", ["kind"], registry=registry
            ),
            store=store,
            operations={name: store.labels(name) for name in STORE_OPERATIONS},
        )


# One set of metrics per registry: a registry refuses the same name twice, and every app a test
# (or a worker) builds shares the process's registry.
_instruments: WeakKeyDictionary[CollectorRegistry, _Instruments] = WeakKeyDictionary()


def _instruments_for(registry: CollectorRegistry) -> _Instruments:
    instruments = _instruments.get(registry)
    if instruments is None:
        instruments = _instruments[registry] = _Instruments.create(registry)
    return instruments


class MetricsObserver(TurnObserver):
    """Turn hooks that feed Prometheus metrics and, with a tracer, one OpenTelemetry trace per turn.

    Metrics, all prefixed `layercode_agent_`:

    - `turn_stage_seconds{stage}` (histogram): seconds from the webhook arriving to each stage.
    - `first_word_overhead_seconds` (histogram): the part of the first word's delay that was this
      backend's, not the LLM's (see `first_word_overhead`).
    - `turns_total{outcome}`: completed, interrupted, failed, duplicate.
    - `active_streams` (gauge): turn responses streaming now (summed over live workers).
    - `llm_errors_total{kind}`: LLM failures by exception class.
    - `store_operation_seconds{operation}` (histogram): begin, close, read.
    """

    def __init__(self, *, registry: CollectorRegistry | None = REGISTRY, tracer: Tracer | None = None) -> None:
        """Create the observer.

        Args:
            registry: Where the metrics live (the process's default registry unless a test gives its
                own); `None` records no metrics (tracing only).
            tracer: Builds each turn's spans; `None` does no tracing work at all.
        """
        self._metrics = _instruments_for(registry) if registry is not None else None
        self._tracer = tracer
        self._failing: set[str] = set()

    def stream_opened(self) -> None:
        """Count a response that started streaming."""
        if self._metrics is not None:
            try:
                self._metrics.active_streams.inc()
            except Exception:
                self._failed("stream_opened")

    def stream_closed(self) -> None:
        """Count a response that finished or was aborted."""
        if self._metrics is not None:
            try:
                self._metrics.active_streams.dec()
            except Exception:
                self._failed("stream_closed")

    def store_operation(self, operation: str, seconds: float) -> None:
        """Observe one store round of the turn record."""
        if self._metrics is not None:
            try:
                child = self._metrics.operations.get(operation) or self._metrics.store.labels(operation)
                child.observe(seconds)
            except Exception:
                self._failed("store_operation")

    def turn_finished(self, report: TurnReport) -> None:
        """Observe the turn's stages, overhead, outcome and LLM error; export its spans if tracing."""
        if self._metrics is not None:
            try:
                self._observe(self._metrics, report)
            except Exception:
                self._failed("turn_finished")
        if self._tracer is not None:
            try:
                _export_spans(self._tracer, report)
            except Exception:
                self._failed("turn spans")

    @staticmethod
    def _observe(metrics: _Instruments, report: TurnReport) -> None:
        stages = metrics.stages
        for stage, ms in report.stages.items():
            (stages.get(stage) or metrics.stage.labels(stage)).observe(ms / 1000)
        if (overhead := first_word_overhead(report.stages)) is not None:
            metrics.overhead.observe(overhead / 1000)
        (metrics.outcomes.get(report.outcome) or metrics.turns.labels(report.outcome)).inc()
        if report.llm_error is not None:
            metrics.llm_errors.labels(report.llm_error).inc()

    def _failed(self, hook: str) -> None:
        # Metrics must never break a turn: say so once per hook, then keep quiet.
        if hook not in self._failing:
            self._failing.add(hook)
            logger.warning("recording %s metrics failed; the turn goes on", hook, exc_info=True)


def _export_spans(tracer: Tracer, report: TurnReport) -> None:
    """One `turn` span from the webhook's arrival to its last stage, a child per stage interval."""
    start = int(report.received_at * 1e9)
    ordered = sorted(report.stages.items(), key=lambda item: item[1])
    attributes: dict[str, str] = {
        "layercode.conversation_id": report.conversation_id,
        "layercode.turn_id": report.turn_id,
        "layercode.outcome": report.outcome,
    }
    if report.llm_error is not None:
        attributes["layercode.llm_error"] = report.llm_error
    turn = tracer.start_span("turn", start_time=start, attributes=attributes)
    context = set_span_in_context(turn)
    previous = 0.0
    for stage, ms in ordered:
        child = tracer.start_span(stage, context=context, start_time=start + int(previous * 1e6))
        child.end(end_time=start + int(ms * 1e6))
        previous = ms
    if report.outcome == "failed":
        turn.set_status(Status(StatusCode.ERROR, report.llm_error or "failed"))
    turn.end(end_time=start + int(previous * 1e6))


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")


def forget_process(directory: str, pid: int) -> None:
    """Drop a worker's live gauges from the multiprocess directory (it exited or died)."""
    mark_process_dead(pid, directory)


def _forget_dead_processes(directory: str) -> None:
    # `livesum` gauges count only processes whose files are there; a worker that crashed never
    # removed its own, so a scrape removes those of processes that no longer exist.
    pids: set[int] = set()
    for path in glob.glob(os.path.join(directory, "gauge_live*.db")):
        if (match := _LIVE_GAUGE_FILE.search(path)) is not None:
            pids.add(int(match.group(1)))
    for pid in pids:
        if not _alive(pid):
            forget_process(directory, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Someone else's process: alive.
    return True


def exposition(registry: CollectorRegistry = REGISTRY, *, multiprocess_dir: str | None = None) -> tuple[bytes, str]:
    """The metrics in Prometheus text format, and its content type.

    Args:
        registry: The registry to expose (single process).
        multiprocess_dir: `PROMETHEUS_MULTIPROC_DIR` when several workers write there: then the
            numbers of every worker are read from it and added up instead.
    """
    if multiprocess_dir:
        _forget_dead_processes(multiprocess_dir)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiprocess_dir)
    return generate_latest(registry), CONTENT_TYPE_LATEST
