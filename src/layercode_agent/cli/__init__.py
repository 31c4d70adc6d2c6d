"""The `layercode-agent` command: `serve`, `chat`, `simulate`, `tunnel`, `sign`, `conversations list|show|delete`.

`main(argv) -> int` is the testable entry point; `run()` is the console script.
"""

from __future__ import annotations

from ._app import app, main, run

__all__ = ["app", "main", "run"]
