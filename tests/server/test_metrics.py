"""`GET /metrics` in process: the app's turns show up in the process registry (read as deltas)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo

from layercode_agent.observability import STAGES

from .conftest import App, AppFactory

pytestmark = pytest.mark.anyio

P = "layercode_agent_"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(app: App) -> Samples:
    response = await app.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (P + name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_a_turn_moves_every_stage_and_the_completed_counter(make_app: AppFactory) -> None:
    async with make_app() as app:
        before = await scrape(app)
        result = await app.client().say("Hi")
        after = await scrape(app)
    assert result.text == "Hello there, friend."
    for stage in STAGES:
        assert moved(before, after, "turn_stage_seconds_count", stage=stage) == 1, stage
    assert moved(before, after, "turns_total", outcome="completed") == 1
    assert moved(before, after, "first_word_overhead_seconds_count") == 1
    assert moved(before, after, "store_operation_seconds_count", operation="begin") == 1
    assert moved(before, after, "store_operation_seconds_count", operation="close") == 1
    assert after[(P + "active_streams", ())] == 0


async def test_a_failing_llm_counts_a_failed_turn_and_its_error(make_app: AppFactory) -> None:
    async def broken(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        raise ConnectionError("the model is down")
        yield ""

    async with make_app(broken) as app:
        before = await scrape(app)
        result = await app.client().say("Hi")
        after = await scrape(app)
    assert "Sorry" in result.text
    assert moved(before, after, "turns_total", outcome="failed") == 1
    assert moved(before, after, "llm_errors_total", kind="ConnectionError") == 1


async def test_metrics_off_means_no_route(make_app: AppFactory) -> None:
    async with make_app(metrics=False) as app:
        response = await app.http.get("/metrics")
        result = await app.client().say("Hi")
    assert response.status_code == 404
    assert result.text == "Hello there, friend."
