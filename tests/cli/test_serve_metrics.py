"""`serve` prepares PROMETHEUS_MULTIPROC_DIR before uvicorn spawns its workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layercode_agent.cli.serve import MULTIPROC_ENV, metrics_dir
from layercode_agent.config import Settings


@pytest.fixture(autouse=True)
def no_multiproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # metrics_dir sets the variable in this process, as serve does before uvicorn.run. Setting it first
    # makes monkeypatch remember the original state and restore it (unset) after each test; a bare
    # delenv of an unset variable records nothing, and the variable would leak into later tests.
    monkeypatch.setenv(MULTIPROC_ENV, "placeholder")
    monkeypatch.delenv(MULTIPROC_ENV)


def test_one_process_needs_no_directory(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert metrics_dir(settings, port=8000, workers=1, reload=False) == (None, False)
    assert metrics_dir(settings, port=8000, workers=4, reload=True) == (None, False)
    assert MULTIPROC_ENV not in os.environ


def test_several_workers_get_a_fresh_directory_per_port(tmp_path: Path) -> None:
    stale = tmp_path / "prometheus" / "8000"
    stale.mkdir(parents=True)
    (stale / "counter_123.db").write_bytes(b"old numbers")
    path, own = metrics_dir(Settings(data_dir=tmp_path), port=8000, workers=2, reload=False)
    assert own and path is not None and path == stale.resolve()
    assert path.is_dir() and list(path.iterdir()) == []
    assert os.environ[MULTIPROC_ENV] == str(path)


def test_a_directory_the_user_set_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    monkeypatch.setenv(MULTIPROC_ENV, str(mine))
    path, own = metrics_dir(Settings(data_dir=tmp_path), port=8000, workers=2, reload=False)
    assert (path, own) == (mine, False)
    assert mine.is_dir()
    assert not (tmp_path / "prometheus").exists()


def test_metrics_off_needs_no_directory(tmp_path: Path) -> None:
    assert metrics_dir(Settings(data_dir=tmp_path, metrics=False), port=8000, workers=2, reload=False) == (None, False)
    assert MULTIPROC_ENV not in os.environ
