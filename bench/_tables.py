"""The figures as tables: rich for the terminal, Markdown for BENCHMARKS.md, from the same rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.table import Table

from ._figures import HISTORY_SPAN, HistoryGrowth, LevelResult, RunFigures, Suite, ratio

__all__ = ["LEGEND", "goal_misses", "history_line", "markdown_table", "rich_table", "scaling_rows"]

LEGEND = (
    "Times in ms. conv.: concurrent conversations. Overhead: first `response.tts` received - webhook sent - "
    "the fake LLM's 200 ms (the issue's definition); LLM-timed: minus the fake's measured time to first token "
    "instead, split into webhook → LLM request and LLM token → `response.tts`. turn: webhook sent → "
    "`response.end` received. Medians of the runs' p50/p90/p99; errors and defects are totals over the runs. "
    "CPU/turn: server CPU (all its processes) / turns. RSS: the server's peak resident memory. Load core: CPU of "
    "load generator + fake LLM (+ Redis) / wall, on their own core(s). (×N): the figure divided by the floor's "
    "at the same level in the same bench (the floor: `bench/floor.py`, a framework-free aiohttp backend on the "
    "same core). Goal: p50 ≤ floor + 3 ms at 1 and 10 conversations; at 100, p50 ≤ 2 × floor + 10 ms, "
    "p99 ≤ 150 ms, CPU/turn ≤ 2 × floor, turns/s ≥ 0.8 × floor; →LLM ≤ 2 ms at 1; nothing lost. Under each "
    "table, webhook → LLM request through one conversation on its own: the median of its first 5 turns and of "
    "the 5 after its 40 earlier exchanges (goal: at most 2 ms more)."
)
"""How to read the tables; printed under them and in the Markdown section."""


HISTORY_GROWTH_GOAL = 2.0
"""Milliseconds the webhook → LLM request time may grow by over 40 earlier exchanges (the issue's goal)."""


def history_line(history: HistoryGrowth) -> str:
    """One line: webhook → LLM request at the start of a long conversation and after its earlier exchanges."""
    last = f"{history.exchanges}-{history.exchanges + HISTORY_SPAN - 1}"
    growth = history.growth
    verdict = (
        ""
        if growth is None
        else " ✓"
        if growth <= HISTORY_GROWTH_GOAL
        else f" ✗ grows by more than {HISTORY_GROWTH_GOAL:g}"
    )
    errors = f", {history.errors} errors" if history.errors else ""
    change = "–" if growth is None else f"{round(growth, 1) + 0.0:+.1f}"  # + 0.0: "+0.0", never "-0.0"
    return (
        f"webhook → LLM request p50, one conversation: {_num(history.first_p50)} ms at 0-{HISTORY_SPAN - 1} earlier "
        f"exchanges, {_num(history.last_p50)} ms at {last} ({change}){verdict}{errors}"
    )


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rate(value: float | None) -> str:
    return _num(value, 0 if value is not None and value >= 10 else 1)


def _times(value: float) -> str:
    return f"×{value:.{2 if value < 1 else 1 if value < 10 else 0}f}"


def _vs(text: str, value: float | None, floor: RunFigures | None, name: str) -> str:
    """`text` with the ratio of `value` to the floor's figure `name`, e.g. `15.2 (×4.5)`."""
    if floor is None:
        return text
    times = ratio(value, getattr(floor, name))
    return text if times is None else f"{text} ({_times(times)})"


def goal_misses(level: LevelResult, figures: RunFigures, floor: RunFigures | None = None) -> list[str]:
    """Which of the issue's goals a level misses (empty: all met); the ones relative to the floor need `floor`."""
    if figures.overhead_p50 is None:
        return ["no data"]
    misses: list[str] = []
    c, p50, p99, cpu = level.concurrency, figures.overhead_p50, figures.overhead_p99, figures.cpu_ms_per_turn
    if c == 1 and figures.to_llm_p50 is not None and figures.to_llm_p50 > 2:
        misses.append("→LLM>2")
    if c >= 100 and p99 is not None and p99 > 150:
        misses.append("p99>150")
    if floor is not None and floor.overhead_p50 is not None:
        if c <= 10 and p50 > floor.overhead_p50 + 3:
            misses.append("p50>floor+3")
        if c >= 100 and p50 > 2 * floor.overhead_p50 + 10:
            misses.append("p50>2×floor+10")
        if c >= 100 and cpu is not None and floor.cpu_ms_per_turn and cpu > 2 * floor.cpu_ms_per_turn:
            misses.append("CPU>2×floor")
        rate = figures.turns_per_s
        if c >= 100 and rate is not None and floor.turns_per_s and rate < 0.8 * floor.turns_per_s:
            misses.append("turns/s<0.8×floor")
    if figures.errors or figures.defects:
        misses.append("lost")
    return misses


_Cell = Callable[[LevelResult, RunFigures, "RunFigures | None"], str]


@dataclass(frozen=True)
class _Column:
    header: str
    cell: _Cell
    redis_only: bool = False
    project_only: bool = False


def _goal(level: LevelResult, f: RunFigures, floor: RunFigures | None) -> str:
    return "✓" if not (misses := goal_misses(level, f, floor)) else "✗ " + ", ".join(misses)


_COLUMNS = (
    _Column("conv.", lambda level, _, __: str(level.concurrency)),
    _Column("turns/s", lambda _, f, b: _vs(_rate(f.turns_per_s), f.turns_per_s, b, "turns_per_s")),
    _Column("overhead\np50", lambda _, f, b: _vs(_num(f.overhead_p50), f.overhead_p50, b, "overhead_p50")),
    _Column("p90", lambda _, f, __: _num(f.overhead_p90)),
    _Column("p99", lambda _, f, b: _vs(_num(f.overhead_p99), f.overhead_p99, b, "overhead_p99")),
    _Column("LLM-timed\np50", lambda _, f, __: _num(f.llm_overhead_p50)),
    _Column("p99", lambda _, f, __: _num(f.llm_overhead_p99)),
    _Column(
        "→LLM +\n→tts p50",
        lambda _, f, b: f"{_vs(_num(f.to_llm_p50), f.to_llm_p50, b, 'to_llm_p50')} + {_num(f.from_llm_p50)}",
    ),
    _Column("turn\np50", lambda _, f, __: _num(f.turn_p50, 0)),
    _Column("CPU/\nturn", lambda _, f, b: _vs(_num(f.cpu_ms_per_turn, 2), f.cpu_ms_per_turn, b, "cpu_ms_per_turn")),
    _Column("Redis\nCPU/turn", lambda _, f, __: _num(f.store_cpu_ms_per_turn, 2), redis_only=True),
    _Column("RSS\nMiB", lambda _, f, __: _num(f.rss_mib, 0)),
    _Column("load\ncore", lambda _, f, __: _num(f.load_core_pct, 0) + "%"),
    _Column("errors", lambda _, f, __: str(f.errors)),
    _Column("defects", lambda _, f, __: str(f.defects)),
    _Column("goal", _goal, project_only=True),
)


def _columns(suite: Suite) -> list[_Column]:
    return [
        column
        for column in _COLUMNS
        if (not column.redis_only or suite.store == "redis") and (not column.project_only or not suite.is_floor)
    ]


def _floor_figures(floor: Suite | None, concurrency: int) -> RunFigures | None:
    level = floor.level(concurrency) if floor is not None else None
    return level.summary if level is not None else None


def _rows(suite: Suite, floor: Suite | None) -> list[list[str]]:
    columns = _columns(suite)
    rows: list[list[str]] = []
    for level in suite.levels:
        figures = level.summary
        base = None if suite.is_floor else _floor_figures(floor, level.concurrency)
        rows.append([column.cell(level, figures, base) for column in columns])
    return rows


def rich_table(suite: Suite, floor: Suite | None = None) -> Table:
    """One store's levels as a rich table; with `floor`, the ratios to its figures beside the project's."""
    table = Table(title=f"{suite.title}: {suite.pinning}", title_justify="left")
    columns = _columns(suite)
    for index, column in enumerate(columns):
        last = index == len(columns) - 1 and not suite.is_floor
        table.add_column(column.header, justify="left" if last else "right", no_wrap=True)
    for row in _rows(suite, floor):
        table.add_row(*row)
    return table


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header.replace("/\n", "/").replace("\n", " ") for header in headers) + " |"]
    lines.append("|" + "|".join("---:" for _ in headers) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def markdown_table(suite: Suite, floor: Suite | None = None) -> str:
    """One store's levels as a Markdown table; with `floor`, the ratios to its figures beside the project's."""
    return _markdown([column.header for column in _columns(suite)], _rows(suite, floor))


_SCALING_HEADERS = (
    "conv.",
    "workers",
    "turns/s",
    "overhead\np50",
    "p99",
    "CPU/\nturn",
    "CPU-bound max\nturns/s",
    "load\ncore",
    "errors",
    "defects",
)


def scaling_rows(baseline: Suite, scaled: Suite, floor: Suite | None = None) -> tuple[tuple[str, ...], list[list[str]]]:
    """Headers and rows comparing `--workers 1` and `--workers N` level by level, with their ratio.

    With `floor`, turns/s, overhead and CPU per turn also show their ratio to the floor's (one process, one core).

    "CPU-bound max" is cores / CPU per turn: the rate at which the server's cores would be saturated, which is
    where more workers pay off (below it, turns/s is bounded by the conversations' own pace).
    """
    rows: list[list[str]] = []
    by_level = {level.concurrency: level for level in baseline.levels}
    for level in scaled.levels:
        one = by_level.get(level.concurrency)
        pair = [(baseline, one), (scaled, level)] if one is not None else [(scaled, level)]
        maxima: list[float | None] = []
        rates: list[float | None] = []
        for suite, result in pair:
            f = result.summary
            cpu = f.cpu_ms_per_turn
            maximum = suite.workers * 1000 / cpu if cpu else None
            maxima.append(maximum)
            rates.append(f.turns_per_s)
            base = _floor_figures(floor, level.concurrency)
            rows.append(
                [
                    str(level.concurrency),
                    str(suite.workers),
                    _vs(_rate(f.turns_per_s), f.turns_per_s, base, "turns_per_s"),
                    _vs(_num(f.overhead_p50), f.overhead_p50, base, "overhead_p50"),
                    _vs(_num(f.overhead_p99), f.overhead_p99, base, "overhead_p99"),
                    _vs(_num(cpu, 2), cpu, base, "cpu_ms_per_turn"),
                    _rate(maximum),
                    _num(f.load_core_pct, 0) + "%",
                    str(f.errors),
                    str(f.defects),
                ]
            )
        if len(pair) == 2:
            rows.append(["", f"{scaled.workers} vs 1", _ratio(rates), "", "", "", _ratio(maxima), "", "", ""])
    return _SCALING_HEADERS, rows


def _ratio(values: list[float | None]) -> str:
    one, many = values
    return f"×{many / one:.2f}" if one and many else "–"


def rich_scaling(baseline: Suite, scaled: Suite, floor: Suite | None = None) -> Table:
    """The workers comparison as a rich table."""
    headers, rows = scaling_rows(baseline, scaled, floor)
    table = Table(title=f"{scaled.store}: --workers {scaled.workers} vs 1 ({scaled.pinning})", title_justify="left")
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def markdown_scaling(baseline: Suite, scaled: Suite, floor: Suite | None = None) -> str:
    """The workers comparison as a Markdown table."""
    headers, rows = scaling_rows(baseline, scaled, floor)
    return _markdown(headers, rows)
