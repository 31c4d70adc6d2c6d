"""The figures as tables: rich for the terminal, Markdown for BENCHMARKS.md, from the same rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.table import Table

from ._figures import LevelResult, RunFigures, Suite

__all__ = ["LEGEND", "goal_misses", "markdown_table", "rich_table", "scaling_rows"]

LEGEND = (
    "Times in ms. conv.: concurrent conversations. Overhead: first `response.tts` received - webhook sent - "
    "the fake LLM's 200 ms (the issue's definition); LLM-timed: minus the fake's measured time to first token "
    "instead, split into webhook → LLM request and LLM token → `response.tts`. turn: webhook sent → "
    "`response.end` received. Medians of the runs' p50/p90/p99; errors and defects are totals over the runs. "
    "CPU/turn: server CPU (all its processes) / turns. RSS: the server's peak resident memory. Load core: CPU of "
    "load generator + fake LLM (+ Redis) / wall, on their own core(s). Goal: p50 ≤ 5 ms up to 50 conversations "
    "and ≤ 10 ms at 100, p99 ≤ 25 ms at 100, CPU/turn ≤ 8 ms, nothing lost."
)
"""How to read the tables; printed under them and in the Markdown section."""


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rate(value: float | None) -> str:
    return _num(value, 0 if value is not None and value >= 10 else 1)


def goal_misses(level: LevelResult, figures: RunFigures) -> list[str]:
    """Which of the issue's goals a level misses (empty: all met)."""
    if figures.overhead_p50 is None:
        return ["no data"]
    misses: list[str] = []
    limit = 5 if level.concurrency <= 50 else 10
    if figures.overhead_p50 > limit:
        misses.append(f"p50>{limit}")
    if level.concurrency >= 100 and figures.overhead_p99 is not None and figures.overhead_p99 > 25:
        misses.append("p99>25")
    if figures.cpu_ms_per_turn is not None and figures.cpu_ms_per_turn > 8:
        misses.append("CPU>8")
    if figures.errors or figures.defects:
        misses.append("lost")
    return misses


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[LevelResult, RunFigures], str]
    redis_only: bool = False


_COLUMNS = (
    _Column("conv.", lambda level, _: str(level.concurrency)),
    _Column("turns/s", lambda _, f: _rate(f.turns_per_s)),
    _Column("overhead\np50", lambda _, f: _num(f.overhead_p50)),
    _Column("p90", lambda _, f: _num(f.overhead_p90)),
    _Column("p99", lambda _, f: _num(f.overhead_p99)),
    _Column("LLM-timed\np50", lambda _, f: _num(f.llm_overhead_p50)),
    _Column("p99", lambda _, f: _num(f.llm_overhead_p99)),
    _Column("→LLM +\n→tts p50", lambda _, f: f"{_num(f.to_llm_p50)} + {_num(f.from_llm_p50)}"),
    _Column("turn\np50", lambda _, f: _num(f.turn_p50, 0)),
    _Column("CPU/\nturn", lambda _, f: _num(f.cpu_ms_per_turn, 2)),
    _Column("Redis\nCPU/turn", lambda _, f: _num(f.store_cpu_ms_per_turn, 2), redis_only=True),
    _Column("RSS\nMiB", lambda _, f: _num(f.rss_mib, 0)),
    _Column("load\ncore", lambda _, f: _num(f.load_core_pct, 0) + "%"),
    _Column("errors", lambda _, f: str(f.errors)),
    _Column("defects", lambda _, f: str(f.defects)),
    _Column("goal", lambda level, f: "✓" if not (m := goal_misses(level, f)) else "✗ " + ", ".join(m)),
)


def _columns(suite: Suite) -> list[_Column]:
    return [column for column in _COLUMNS if not column.redis_only or suite.store == "redis"]


def _rows(suite: Suite) -> list[list[str]]:
    columns = _columns(suite)
    rows: list[list[str]] = []
    for level in suite.levels:
        figures = level.summary
        rows.append([column.cell(level, figures) for column in columns])
    return rows


def rich_table(suite: Suite) -> Table:
    """One store's levels as a rich table."""
    table = Table(title=f"{suite.title}: {suite.pinning}", title_justify="left")
    for index, column in enumerate(_columns(suite)):
        last = index == len(_columns(suite)) - 1
        table.add_column(column.header, justify="left" if last else "right", no_wrap=True)
    for row in _rows(suite):
        table.add_row(*row)
    return table


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header.replace("/\n", "/").replace("\n", " ") for header in headers) + " |"]
    lines.append("|" + "|".join("---:" for _ in headers) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def markdown_table(suite: Suite) -> str:
    """One store's levels as a Markdown table."""
    return _markdown([column.header for column in _columns(suite)], _rows(suite))


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


def scaling_rows(baseline: Suite, scaled: Suite) -> tuple[tuple[str, ...], list[list[str]]]:
    """Headers and rows comparing `--workers 1` and `--workers N` level by level, with their ratio.

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
            rows.append(
                [
                    str(level.concurrency),
                    str(suite.workers),
                    _rate(f.turns_per_s),
                    _num(f.overhead_p50),
                    _num(f.overhead_p99),
                    _num(cpu, 2),
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


def rich_scaling(baseline: Suite, scaled: Suite) -> Table:
    """The workers comparison as a rich table."""
    headers, rows = scaling_rows(baseline, scaled)
    table = Table(title=f"{scaled.store}: --workers {scaled.workers} vs 1 ({scaled.pinning})", title_justify="left")
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def markdown_scaling(baseline: Suite, scaled: Suite) -> str:
    """The workers comparison as a Markdown table."""
    headers, rows = scaling_rows(baseline, scaled)
    return _markdown(headers, rows)
