"""The `layercode-agent` command: `serve`, `sign`, `conversations list|show|delete`, `--version`.

`main(argv) -> int` is the testable entry point; `run()` is the console script.
"""

from __future__ import annotations

from ._app import app, main, run

__all__ = ["app", "main", "run"]
