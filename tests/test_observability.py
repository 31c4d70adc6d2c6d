"""MetricsObserver against a registry of its own, spans into the SDK's in-memory exporter, multiprocess scrapes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from layercode_agent.observability import (
    LATENCY_BUCKETS,
    OUTCOMES,
    STAGES,
    MetricsObserver,
    exposition,
    first_word_overhead,
)
from layercode_agent.turns import TurnReport

P = "layercode_agent_"

FULL = {
    "signature_verified": 0.2,
    "history_loaded": 3.5,
    "llm_request": 5.0,
    "llm_first_token": 180.0,
    "first_tts": 181.25,
    "llm_last_token": 640.0,
    "history_saved": 644.0,
    "response_end": 644.5,
}


def report(
    outcome: str = "completed", stages: dict[str, float] | None = None, llm_error: str | None = None
) -> TurnReport:
    return TurnReport(
        conversation_id="lc_conv_1",
        turn_id="turn_1",
        outcome=outcome,
        stages=dict(FULL if stages is None else stages),
        received_at=1_700_000_000.25,
        llm_error=llm_error,
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(P + name, labels)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def spans() -> Iterator[tuple[Tracer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


# --- Prometheus -------------------------------------------------------------------------------------


def test_every_stage_is_observed_in_seconds(registry: CollectorRegistry) -> None:
    MetricsObserver(registry=registry).turn_finished(report())
    for stage, ms in FULL.items():
        assert value(registry, "turn_stage_seconds_count", stage=stage) == 1
        assert value(registry, "turn_stage_seconds_sum", stage=stage) == pytest.approx(ms / 1000)
    # 180 ms to the first token falls in the 0.2 s bucket, not the 0.15 s one.
    assert value(registry, "turn_stage_seconds_bucket", stage="llm_first_token", le="0.15") == 0
    assert value(registry, "turn_stage_seconds_bucket", stage="llm_first_token", le="0.2") == 1
    assert LATENCY_BUCKETS[0] == 0.001 and LATENCY_BUCKETS[-1] == 30.0


def test_a_turn_cut_short_observes_only_the_stages_it_reached(registry: CollectorRegistry) -> None:
    reached = {"signature_verified": 0.1, "history_loaded": 2.0, "llm_request": 3.0}
    MetricsObserver(registry=registry).turn_finished(report("interrupted", reached))
    for stage in STAGES:
        assert value(registry, "turn_stage_seconds_count", stage=stage) == (1 if stage in reached else 0)
    assert value(registry, "first_word_overhead_seconds_count") == 0


def test_first_word_overhead_is_the_time_not_spent_waiting_for_the_llm(registry: CollectorRegistry) -> None:
    # llm_request (5 ms) + first_tts - llm_first_token (1.25 ms): the LLM's 175 ms are not ours.
    assert first_word_overhead(FULL) == pytest.approx(6.25)
    MetricsObserver(registry=registry).turn_finished(report())
    assert value(registry, "first_word_overhead_seconds_count") == 1
    assert value(registry, "first_word_overhead_seconds_sum") == pytest.approx(0.00625)


def test_a_filler_spoken_before_the_first_token_has_no_overhead() -> None:
    assert first_word_overhead({**FULL, "first_tts": 90.0}) is None
    assert first_word_overhead({"signature_verified": 0.1, "first_tts": 4.0}) is None  # A duplicate's replay.


def test_turns_are_counted_by_outcome_and_llm_errors_by_kind(registry: CollectorRegistry) -> None:
    observer = MetricsObserver(registry=registry)
    # Every outcome exists from the start at 0, so rate() works from the first turn on.
    for outcome in OUTCOMES:
        assert value(registry, "turns_total", outcome=outcome) == 0
    observer.turn_finished(report())
    observer.turn_finished(report())
    observer.turn_finished(report("interrupted"))
    observer.turn_finished(report("failed", llm_error="ModelHTTPError"))
    observer.turn_finished(report("failed", llm_error="TimeoutError"))
    observer.turn_finished(report("failed", llm_error="ModelHTTPError"))
    observer.turn_finished(report("duplicate", {"signature_verified": 0.1, "history_loaded": 1.0}))
    observer.turn_finished(report("lost"))  # An outcome this module does not know yet still counts.
    assert value(registry, "turns_total", outcome="completed") == 2
    assert value(registry, "turns_total", outcome="interrupted") == 1
    assert value(registry, "turns_total", outcome="failed") == 3
    assert value(registry, "turns_total", outcome="duplicate") == 1
    assert value(registry, "turns_total", outcome="lost") == 1
    assert value(registry, "llm_errors_total", kind="ModelHTTPError") == 2
    assert value(registry, "llm_errors_total", kind="TimeoutError") == 1


def test_the_active_streams_gauge_balances(registry: CollectorRegistry) -> None:
    observer = MetricsObserver(registry=registry)
    for _ in range(3):
        observer.stream_opened()
    observer.stream_closed()
    assert value(registry, "active_streams") == 2
    observer.stream_closed()
    observer.stream_closed()
    assert value(registry, "active_streams") == 0


def test_store_operations_are_timed_by_operation(registry: CollectorRegistry) -> None:
    observer = MetricsObserver(registry=registry)
    observer.store_operation("begin", 0.0008)
    observer.store_operation("close", 0.0012)
    observer.store_operation("close", 0.0004)
    observer.store_operation("read", 0.002)
    observer.store_operation("change", 0.003)
    assert value(registry, "store_operation_seconds_count", operation="begin") == 1
    assert value(registry, "store_operation_seconds_count", operation="close") == 2
    assert value(registry, "store_operation_seconds_sum", operation="close") == pytest.approx(0.0016)
    assert value(registry, "store_operation_seconds_bucket", operation="close", le="0.0005") == 1
    assert value(registry, "store_operation_seconds_count", operation="read") == 1
    assert value(registry, "store_operation_seconds_count", operation="change") == 1


def test_observers_of_one_registry_share_its_metrics(registry: CollectorRegistry) -> None:
    # Every app a process builds gets an observer; the registry must not see the names twice.
    MetricsObserver(registry=registry).turn_finished(report())
    MetricsObserver(registry=registry).turn_finished(report())
    assert value(registry, "turns_total", outcome="completed") == 2


def test_the_exposition_is_prometheus_text_with_the_prefix(registry: CollectorRegistry) -> None:
    MetricsObserver(registry=registry).turn_finished(report())
    body, content_type = exposition(registry)
    assert content_type.startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert {
        P + "turn_stage_seconds",
        P + "first_word_overhead_seconds",
        P + "turns",
        P + "active_streams",
        P + "llm_errors",
        P + "store_operation_seconds",
    } <= set(families)
    assert families[P + "turn_stage_seconds"].type == "histogram"
    assert families[P + "active_streams"].type == "gauge"


class Broken:
    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("metrics backend exploded")


def test_hooks_never_raise_and_warn_once(caplog: pytest.LogCaptureFixture, registry: CollectorRegistry) -> None:
    observer = MetricsObserver(registry=registry, tracer=Broken())  # type: ignore[arg-type]
    observer._metrics = Broken()  # type: ignore[assignment]
    for _ in range(3):
        observer.stream_opened()
        observer.stream_closed()
        observer.store_operation("begin", 0.001)
        observer.turn_finished(report())
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 5, [record.getMessage() for record in warnings]  # One per hook, then quiet.


def test_hooks_take_microseconds(registry: CollectorRegistry) -> None:
    observer = MetricsObserver(registry=registry)
    turn = report()
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        observer.stream_opened()
        observer.store_operation("begin", 0.001)
        observer.store_operation("close", 0.001)
        observer.turn_finished(turn)
        observer.stream_closed()
    per_turn_us = (time.perf_counter() - started) / rounds * 1e6
    print(f"metrics hooks: {per_turn_us:.1f} us per turn")
    assert per_turn_us < 500  # Typically ~20 us; the bound only catches an accidental slow path.


# --- OpenTelemetry ----------------------------------------------------------------------------------


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in finished}


def test_a_turn_span_with_a_child_per_stage_interval(
    spans: tuple[Tracer, InMemorySpanExporter], registry: CollectorRegistry
) -> None:
    tracer, exporter = spans
    MetricsObserver(registry=registry, tracer=tracer).turn_finished(report())
    finished = exporter.get_finished_spans()
    assert len(finished) == 1 + len(FULL)
    turn = by_name(finished)["turn"]
    children = sorted((span for span in finished if span.name != "turn"), key=lambda span: span.start_time or 0)
    assert [child.name for child in children] == list(FULL)
    start = int(1_700_000_000.25 * 1e9)
    assert turn.start_time == start
    assert turn.end_time == start + int(FULL["response_end"] * 1e6)
    assert turn.parent is None
    assert turn.attributes == {
        "layercode.conversation_id": "lc_conv_1",
        "layercode.turn_id": "turn_1",
        "layercode.outcome": "completed",
    }
    assert turn.status.status_code == StatusCode.UNSET
    previous_end = start
    turn_context = turn.get_span_context()
    assert turn_context is not None
    for child, ms in zip(children, FULL.values(), strict=True):
        assert child.parent is not None and child.parent.span_id == turn_context.span_id
        assert child.context is not None and child.context.trace_id == turn_context.trace_id
        assert child.start_time == previous_end  # Each interval starts where the previous stage ended.
        assert child.end_time == start + int(ms * 1e6)
        previous_end = child.end_time
    assert previous_end == turn.end_time


def test_stage_spans_follow_the_order_stages_happened(
    spans: tuple[Tracer, InMemorySpanExporter], registry: CollectorRegistry
) -> None:
    # A filler spoken before the first token: first_tts comes before llm_first_token.
    tracer, exporter = spans
    stages = {"signature_verified": 0.1, "history_loaded": 2.0, "llm_request": 3.0, "llm_first_token": 900.0}
    stages["first_tts"] = 400.0
    MetricsObserver(registry=registry, tracer=tracer).turn_finished(report("interrupted", stages))
    children = [span for span in exporter.get_finished_spans() if span.name != "turn"]
    children.sort(key=lambda span: span.start_time or 0)
    assert [child.name for child in children] == [
        "signature_verified",
        "history_loaded",
        "llm_request",
        "first_tts",
        "llm_first_token",
    ]
    assert all((child.end_time or 0) >= (child.start_time or 0) for child in children)


def test_a_failed_turn_span_carries_the_llm_error(spans: tuple[Tracer, InMemorySpanExporter]) -> None:
    tracer, exporter = spans
    MetricsObserver(registry=None, tracer=tracer).turn_finished(report("failed", llm_error="ModelHTTPError"))
    turn = by_name(exporter.get_finished_spans())["turn"]
    assert turn.attributes is not None
    assert turn.attributes["layercode.outcome"] == "failed"
    assert turn.attributes["layercode.llm_error"] == "ModelHTTPError"
    assert turn.status.status_code == StatusCode.ERROR
    assert turn.status.description == "ModelHTTPError"


def test_without_a_tracer_no_spans_and_without_a_registry_no_metrics(
    spans: tuple[Tracer, InMemorySpanExporter], registry: CollectorRegistry
) -> None:
    tracer, exporter = spans
    MetricsObserver(registry=registry).turn_finished(report())
    assert exporter.get_finished_spans() == ()
    observer = MetricsObserver(registry=None, tracer=tracer)
    observer.stream_opened()
    observer.store_operation("begin", 0.001)
    observer.turn_finished(report())
    observer.stream_closed()
    assert observer._metrics is None
    assert len(exporter.get_finished_spans()) == 1 + len(FULL)


# --- Several processes ------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys
    from layercode_agent.observability import MetricsObserver
    from layercode_agent.turns import TurnReport

    observer = MetricsObserver()
    observer.stream_opened()  # Never closed: a worker that dies mid-stream.
    for _ in range(int(sys.argv[1])):
        observer.turn_finished(TurnReport("c", "t", "completed", {"signature_verified": 0.5}, 0.0))
    print("ready", flush=True)
    if sys.argv[2] == "stay":
        sys.stdin.readline()
    """
)


def worker(directory: Path, turns: int, stay: bool) -> subprocess.Popen[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(turns), "stay" if stay else "exit"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return process


def ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"


def scrape(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = exposition(multiprocess_dir=str(directory))
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_a_multiprocess_scrape_adds_up_every_worker_and_forgets_dead_ones(tmp_path: Path) -> None:
    # Both start at once (each imports the agent stack, seconds), one exits, one stays up.
    with worker(tmp_path, 2, stay=True) as alive, worker(tmp_path, 3, stay=False) as dead:
        ready(alive)
        ready(dead)
        dead.wait(timeout=30)
        samples = scrape(tmp_path)
        assert samples[(P + "turns_total", (("outcome", "completed"),))] == 5
        assert samples[(P + "turn_stage_seconds_count", (("stage", "signature_verified"),))] == 5
        # The dead worker's open stream is gone; the live one's still counts.
        assert samples[(P + "active_streams", ())] == 1
        assert alive.stdin is not None
        alive.stdin.write("\n")
        alive.stdin.flush()
        alive.wait(timeout=30)
    samples = scrape(tmp_path)
    assert samples[(P + "turns_total", (("outcome", "completed"),))] == 5  # Counts outlive their worker.
    # No live worker left: no live gauge either (in a server, the scraping worker's own reads 0).
    assert samples.get((P + "active_streams", ()), 0) == 0
