"""The cyclic garbage collector, set for a worker that streams turns: the start-up heap frozen, fewer young passes.

With CPython's defaults a full collection walks every object the imports, pydantic's schemas and the agent
built at start-up: about 100 ms each under the bench (SQLite, 100 conversations, one core; timed with the
collector's own callbacks), three in a 10-second window, each stopping every reply stream at once. Frozen
after start-up (`gc.freeze`: those objects are never walked again) and with the youngest generation
collected after 10,000 net allocations instead of 700, the same window had about a dozen young passes of
about 7 ms and no full one. Interleaved bench runs (three of each, twice; medians): p99 of the first word's
wait 68 and 105 ms against 146 and 142 ms with the defaults, CPU per turn 9.20 and 9.68 ms against 9.24
and 9.92 ms. BENCHMARKS.md has the figures of a full run.

Only the interpreter's own thresholds are changed: a process that set its own (`gc.set_threshold` in the
user's `AGENT` module, say) keeps them. Everything is put back when the app stops, so a process that runs
several apps one after another (the tests) collects what each left behind.
"""

from __future__ import annotations

import gc
from collections.abc import Generator
from contextlib import contextmanager
from typing import Final

__all__ = ["YOUNG_THRESHOLD", "settled_heap"]

YOUNG_THRESHOLD: Final = 10_000
"""Net allocations between two collections of the youngest generation (CPython's default: 700 or 2,000)."""

_INTERPRETER_DEFAULTS: Final = gc.get_threshold()
"""The thresholds when this module was first imported, before any app ran: the interpreter's own."""


@contextmanager
def settled_heap() -> Generator[None]:
    """While the app serves: the heap built so far frozen, and young collections rarer (see the module docstring)."""
    before = gc.get_threshold()
    tune = before == _INTERPRETER_DEFAULTS and before[0] < YOUNG_THRESHOLD
    gc.collect()  # What start-up left as garbage goes now, not frozen with the rest.
    gc.freeze()
    if tune:
        gc.set_threshold(YOUNG_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        if tune and gc.get_threshold()[0] == YOUNG_THRESHOLD:
            gc.set_threshold(*before)
        gc.unfreeze()
