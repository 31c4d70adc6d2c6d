"""Fixtures of the CLI tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import hostile


@pytest.fixture
def odd_backend() -> Iterator[str]:
    """The base URL of a backend that answers with what would drive a terminal (see `hostile`)."""
    with hostile.odd_backend() as url:
        yield url
