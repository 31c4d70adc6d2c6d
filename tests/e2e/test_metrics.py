"""`/metrics` and turn spans on the real `layercode-agent serve`, one process and `--workers 2`.

The server answers Layercode-style turns from the OpenAI-compatible fake; the test reads `/metrics`
as Prometheus would, and (for tracing) receives the spans in a fake OTLP/HTTP collector.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from layercode_agent.client import WebhookClient
from layercode_agent.observability import STAGES

from ..fakes.openai_server import FakeOpenAI, Reply
from ..fakes.otlp_collector import FakeCollector, ReceivedSpan
from ..fakes.server_process import ServerProcess, server_env, sqlite_url

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_metrics"
P = "layercode_agent_"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_env(fake_llm: FakeOpenAI, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="", store_url=sqlite_url(tmp_path / "data"))
    return {**env, **extra}


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((P + name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: httpx.AsyncClient, server: ServerProcess) -> Samples:
    response = await http.get(f"{server.base}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


async def scrape_until(
    http: httpx.AsyncClient, server: ServerProcess, done: Callable[[Samples], bool], within: float = 15.0
) -> Samples:
    """Scrape until `done` holds: a turn is counted when it ends, just after its `response.end` left."""
    deadline = time.monotonic() + within
    while True:
        samples = await scrape(http, server)
        if done(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


def counted(outcome: str, expected: float) -> Callable[[Samples], bool]:
    return lambda samples: get(samples, "turns_total", outcome=outcome) >= expected


# --- One process ------------------------------------------------------------------------------------


async def test_turns_of_every_outcome_show_up_in_metrics(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    with ServerProcess(metrics_env(fake_llm, tmp_path), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            client = WebhookClient(server.url, SECRET, http=http)
            before = await scrape(http, server)

            # A completed turn: every stage once.
            completed = await client.say("Hi!")
            after_completed = await scrape_until(http, server, counted("completed", 1))

            # Layercode aborts the request mid-stream (barge-in or hang-up).
            fake_llm.script(Reply(tokens=[f" word{index}" for index in range(60)], token_delay=0.05))
            seen = 0
            stream = cast(
                AsyncGenerator[tuple[float, dict[str, Any]]], client.stream(client.body("message", text="Go"))
            )
            async with aclosing(stream) as events:
                async for _, event in events:
                    seen += event["type"] == "response.tts"
                    if seen == 2:
                        break
            after_abort = await scrape_until(http, server, counted("interrupted", 1))

            # The LLM fails (every retry of the OpenAI client too).
            fake_llm.default = Reply(fail="http500")
            try:
                failed = await client.say("Still there?")
            finally:
                fake_llm.default = Reply()
            after_failure = await scrape_until(http, server, counted("failed", 1))

            # The same delivery twice: the second is a duplicate.
            raw = json.dumps(client.body("message", text="Once."), separators=(",", ":")).encode()
            headers = client.signed(raw)
            for _ in range(2):
                async with http.stream("POST", server.url, content=raw, headers=headers) as response:
                    await response.aread()
            final = await scrape_until(http, server, counted("duplicate", 1))

    assert completed.text == "Hello there, how can I help?"
    assert "Sorry" in failed.text
    assert all(value == 0 for (name, _), value in before.items() if name == P + "turns_total")
    for stage in STAGES:
        assert get(after_completed, "turn_stage_seconds_count", stage=stage) == 1, stage
    assert get(after_completed, "turns_total", outcome="completed") == 1
    assert get(after_completed, "first_word_overhead_seconds_count") == 1
    # The first word's overhead is part of the time to the first words.
    assert get(after_completed, "first_word_overhead_seconds_sum") <= get(
        after_completed, "turn_stage_seconds_sum", stage="first_tts"
    )
    assert get(after_completed, "store_operation_seconds_count", operation="begin") == 1
    assert get(after_completed, "store_operation_seconds_count", operation="close") == 1

    assert get(after_abort, "turns_total", outcome="interrupted") == 1
    assert get(after_abort, "turn_stage_seconds_count", stage="first_tts") == 2
    assert get(after_abort, "turn_stage_seconds_count", stage="response_end") == 1  # Never sent to the aborted one.

    assert get(after_failure, "turns_total", outcome="failed") == 1
    assert get(after_failure, "llm_errors_total", kind="ModelServerError") == 1

    assert get(final, "turns_total", outcome="duplicate") == 1
    assert get(final, "turns_total", outcome="completed") == 2  # The first delivery of "Once."
    assert get(final, "turn_stage_seconds_count", stage="signature_verified") == 5
    assert get(final, "active_streams") == 0


async def test_metrics_off_has_no_route(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    with ServerProcess(metrics_env(fake_llm, tmp_path, METRICS="false"), cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            response = await http.get(f"{server.base}/metrics")
            answer = await WebhookClient(server.url, SECRET, http=http).say("Hi!")
        log = server.log
    assert response.status_code == 404
    assert answer.text == "Hello there, how can I help?"
    assert re.search(r"metrics +off \(METRICS=false\)", log), log


# --- Two workers ------------------------------------------------------------------------------------


def per_worker_turns(directory: Path) -> dict[str, float]:
    """Completed turns each worker wrote to the multiprocess directory (one `counter_PID.db` per worker)."""
    turns: dict[str, float] = {}
    for path in sorted(directory.glob("counter_*.db")):
        total = 0.0
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if sample.name == P + "turns_total" and sample.labels.get("outcome") == "completed":
                    total += sample.value
        turns[path.stem.removeprefix("counter_")] = total
    return turns


async def test_two_workers_count_every_turn_whichever_answers(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    fake_llm.default = Reply(tokens=["One", " moment", " please."], first_token_delay=0.05, token_delay=0.02)
    with ServerProcess(metrics_env(fake_llm, tmp_path), cwd=tmp_path, args=("--workers", "2")) as server:
        directory = tmp_path / "data" / "prometheus" / str(server.port)
        # A new connection per request, so the kernel hands them to both workers.
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=fresh) as http:
            total = 0
            for _ in range(5):  # Batches until both workers answered some (normally the first).
                batch = [WebhookClient(server.url, SECRET, http=http) for _ in range(16)]
                results = await asyncio.gather(*(client.say("Hello?") for client in batch))
                assert all(result.text == "One moment please." for result in results)
                total += len(batch)
                await scrape_until(http, server, counted("completed", total))
                if sum(1 for turns in per_worker_turns(directory).values() if turns) >= 2:
                    break
            # Every scrape, whichever worker answers it, sums up both.
            scrapes = [await scrape(http, server) for _ in range(6)]
            workers = per_worker_turns(directory)
        log = server.log
    assert sum(1 for turns in workers.values() if turns) == 2, workers
    assert sum(workers.values()) == total
    for samples in scrapes:
        assert get(samples, "turns_total", outcome="completed") == total
        for stage in STAGES:
            assert get(samples, "turn_stage_seconds_count", stage=stage) == total, stage
        assert get(samples, "active_streams") == 0
    banner = " ".join(log.split())  # The banner's table may wrap a long row.
    assert re.search(r"metrics GET http://localhost:\d+/metrics \(sum of 2 workers\)", banner), log
    # `serve` removes the directory it made once the workers are gone.
    assert not directory.exists()


# --- Spans ------------------------------------------------------------------------------------------


async def test_each_turn_becomes_a_trace_in_an_otlp_collector(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    with FakeCollector() as collector:
        env = metrics_env(
            fake_llm,
            tmp_path,
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.base_url,
            OTEL_EXPORTER_OTLP_HEADERS="x-collector-key=k%201",
            OTEL_BSP_SCHEDULE_DELAY="50",  # ms: export quickly, the test waits for it.
        )
        with ServerProcess(env, cwd=tmp_path) as server:
            async with WebhookClient(server.url, SECRET) as client:
                body = client.body("message", text="Hi!")
                started = time.time()
                answer = await client.turn(body)
            for _ in range(300):  # The batch processor exports every 50 ms here; wait up to 15 s.
                if any(span.name == "turn" for span in collector.spans):
                    break
                await asyncio.sleep(0.05)
            log = server.log
    assert answer.text == "Hello there, how can I help?"
    turns = [span for span in collector.spans if span.name == "turn"]
    assert len(turns) == 1, collector.spans
    turn = turns[0]
    assert turn.parent_span_id == ""
    assert turn.resource["service.name"] == "layercode-agent"
    assert turn.headers["x-collector-key"] == "k 1"
    assert turn.attributes == {
        "layercode.conversation_id": client.conversation_id,
        "layercode.turn_id": body["turn_id"],
        "layercode.outcome": "completed",
    }
    assert abs(turn.start_ns / 1e9 - started) < 5
    children: list[ReceivedSpan] = sorted(
        (span for span in collector.spans if span.parent_span_id == turn.span_id), key=lambda span: span.start_ns
    )
    assert {child.name for child in children} == set(STAGES)
    assert all(child.trace_id == turn.trace_id for child in children)
    assert children[0].start_ns == turn.start_ns
    for earlier, later in zip(children, children[1:], strict=False):
        assert later.start_ns == earlier.end_ns
    assert children[-1].end_ns == turn.end_ns
    assert f"sending turn spans to {collector.base_url}/v1/traces" in log
    assert "k%201" not in log
