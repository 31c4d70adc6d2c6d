"""The bench as a picture: overhead p50, overhead p99 and CPU per turn against concurrency, project vs floor.

Hand-written SVG (no plotting dependency; GitHub shows it as an image): three panels side by side, levels evenly
spaced on the x axis, a logarithmic y axis (the figures span 1 ms to seconds), one line per store of the
project and a dashed black one for the floor. Every line is a `<polyline class="series">` with `data-series`
(the store, or `floor`) and `data-panel` (the figure), so tests and scripts can read the chart back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape

from ._figures import Suite

__all__ = ["PANELS", "chart_svg"]

PANELS = (
    ("overhead_p50", "overhead p50 (ms)"),
    ("overhead_p99", "overhead p99 (ms)"),
    ("cpu_ms_per_turn", "CPU per turn (ms)"),
)
"""The figure each panel shows, and its title."""

_COLORS = {"floor": "#000000", "memory": "#1f77b4", "sqlite": "#ff7f0e", "redis": "#d62728"}
_WIDTH, _HEIGHT = 300, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 46, 12, 28, 40
_LEGEND = 30
_LOWEST = 0.1
"""Values at or below zero are drawn at this (ms), the bottom of any log axis here."""


def _ticks(low: float, high: float) -> list[float]:
    ticks: list[float] = []
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    mantissas = (1, 2, 5) if last - first <= 3 else (1,)
    for exponent in range(first, last + 1):
        for mantissa in mantissas:
            value = mantissa * 10.0**exponent
            if low * 0.999 <= value <= high * 1.001:
                ticks.append(value)
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if value < 1000 else f"{value / 1000:g}k"


def _panel(index: int, name: str, title: str, series: Sequence[tuple[str, Suite]], levels: Sequence[int]) -> list[str]:
    x0 = index * _WIDTH
    values = [
        max(value, _LOWEST)
        for _, suite in series
        for level in suite.levels
        if (value := getattr(level.summary, name)) is not None
    ]
    low, high = (min(values), max(values)) if values else (1.0, 10.0)
    low = 10.0 ** math.floor(math.log10(low))
    high = 10.0 ** math.ceil(math.log10(high)) if high > low else low * 10
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def x(level: int) -> float:
        position = levels.index(level)
        return x0 + _LEFT + (plot_w * (position + 0.5) / len(levels))

    def y(value: float) -> float:
        fraction = (math.log10(max(value, _LOWEST)) - math.log10(low)) / (math.log10(high) - math.log10(low))
        return _LEGEND + _TOP + plot_h * (1 - fraction)

    top, bottom = _LEGEND + _TOP, _LEGEND + _TOP + plot_h
    parts = [f'<g class="panel" data-panel="{name}">']
    parts.append(
        f'<text x="{x0 + _LEFT + plot_w / 2:.1f}" y="{top - 10}" text-anchor="middle" '
        f'font-weight="bold">{escape(title)}</text>'
    )
    parts.append(f'<rect x="{x0 + _LEFT}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for tick in _ticks(low, high):
        ty = y(tick)
        parts.append(f'<line x1="{x0 + _LEFT}" x2="{x0 + _LEFT + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{x0 + _LEFT - 4}" y="{ty + 4:.1f}" text-anchor="end">{_label(tick)}</text>')
    for level in levels:
        parts.append(f'<text x="{x(level):.1f}" y="{bottom + 16}" text-anchor="middle">{level}</text>')
    parts.append(
        f'<text x="{x0 + _LEFT + plot_w / 2:.1f}" y="{bottom + 32}" text-anchor="middle" '
        'fill="#555">concurrent conversations</text>'
    )
    for label, suite in series:
        color = _COLORS.get(label, "#2ca02c")
        dash = ' stroke-dasharray="5,3"' if label == "floor" else ""
        points = [
            (level.concurrency, value)
            for level in suite.levels
            if (value := getattr(level.summary, name)) is not None and level.concurrency in levels
        ]
        coordinates = " ".join(f"{x(c):.1f},{y(v):.1f}" for c, v in points)
        parts.append(
            f'<polyline class="series" data-series="{escape(label)}" data-panel="{name}" points="{coordinates}" '
            f'fill="none" stroke="{color}" stroke-width="2"{dash}/>'
        )
        for c, v in points:
            parts.append(
                f'<circle cx="{x(c):.1f}" cy="{y(v):.1f}" r="3" fill="{color}">'
                f"<title>{escape(label)}, {c} conversations: {v:.1f} ms</title></circle>"
            )
    parts.append("</g>")
    return parts


def chart_svg(suites: Sequence[Suite], floor: Suite | None) -> str:
    """The chart of the one-worker `suites` (one line each) and the `floor`, as an SVG document."""
    series = [(suite.store, suite) for suite in suites if suite.workers == 1 and not suite.is_floor]
    if floor is not None:
        series.append(("floor", floor))
    levels = sorted({level.concurrency for _, suite in series for level in suite.levels})
    width, height = _WIDTH * len(PANELS), _HEIGHT + _LEGEND
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="11">',
        "<title>Overhead and CPU per turn against concurrency: the project's stores and the floor</title>",
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
    ]
    offset = _LEFT
    for label, _ in series:
        color = _COLORS.get(label, "#2ca02c")
        dash = ' stroke-dasharray="5,3"' if label == "floor" else ""
        name = "floor (framework-free)" if label == "floor" else f"project, {label}"
        parts.append(
            f'<line x1="{offset}" x2="{offset + 24}" y1="16" y2="16" stroke="{color}" stroke-width="2"{dash}/>'
        )
        parts.append(f'<text x="{offset + 30}" y="20">{escape(name)}</text>')
        offset += 40 + 7 * len(name)
    parts.append(f'<text x="{width - 8}" y="20" text-anchor="end" fill="#555">log scale</text>')
    for index, (name, title) in enumerate(PANELS):
        parts += _panel(index, name, title, series, levels)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
