"""The collector while an app serves (`server/heap.py`): start-up heap frozen, young passes rarer, then put back."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from layercode_agent.server import heap
from layercode_agent.server.heap import YOUNG_THRESHOLD, settled_heap

from .conftest import AppFactory


@pytest.fixture(autouse=True)
def interpreter_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(*heap._INTERPRETER_DEFAULTS)  # pyright: ignore[reportPrivateUsage]
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_heap_built_before_is_frozen_and_young_passes_are_rarer_until_it_ends() -> None:
    defaults = gc.get_threshold()
    assert defaults[0] < YOUNG_THRESHOLD
    with settled_heap():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *defaults[1:])
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == defaults


def test_thresholds_someone_set_are_kept() -> None:
    gc.set_threshold(1234, 7, 9)
    with settled_heap():
        assert gc.get_threshold() == (1234, 7, 9)
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (1234, 7, 9)
    assert gc.get_freeze_count() == 0


def test_thresholds_changed_while_serving_are_not_undone() -> None:
    with settled_heap():
        gc.set_threshold(5000, 10, 10)
    assert gc.get_threshold() == (5000, 10, 10)


@pytest.mark.anyio
async def test_the_app_settles_the_heap_while_it_serves(make_app: AppFactory) -> None:
    defaults = gc.get_threshold()
    async with make_app() as app:
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.get_freeze_count() > 0
        response = await app.http.get("/health")
        assert response.status_code == 200
    assert gc.get_threshold() == defaults
    assert gc.get_freeze_count() == 0
