"""Installs `tests.fakes.stalled_disk` in a server process started with this folder first on `PYTHONPATH`."""

from __future__ import annotations

import os
from pathlib import Path

from tests.fakes.stalled_disk import FLAG_ENV, install

if flag := os.environ.get(FLAG_ENV):
    install(Path(flag))
