"""What the figures were taken on and with: the machine's description, and the Markdown section of BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sqlite3
import subprocess
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from ._figures import Suite
from ._procs import REPO
from ._tables import LEGEND, history_line, markdown_scaling, markdown_table

__all__ = ["machine_info", "machine_line", "markdown_section", "settings_line"]


# --- The machine ------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else "") if head.returncode == 0 else "?"


def _filesystem(path: str) -> str:
    """The type of the filesystem holding `path` (the SQLite file's: tmpfs makes fsync free), from /proc/mounts."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def machine_info() -> dict[str, Any]:
    """The CPU, cores, OS, Python and the versions that shape the figures."""
    packages = ("layercode-agent", "pydantic-ai-slim", "fastapi", "starlette", "uvicorn", "uvloop", "httptools")
    redis = ""
    if binary := shutil.which("redis-server"):
        redis = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {package: _version(package) for package in (*packages, "redis")},
        "sqlite": sqlite3.sqlite_version,
        "tmp_filesystem": _filesystem(str(Path(tempfile.gettempdir()).resolve())),
        "redis_server": redis.split(" sha=")[0].removeprefix("Redis server v=").strip() or "not found",
        "commit": _git(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def settings_line(settings: dict[str, Any]) -> str:
    return (
        f"{settings['turns']} turns per conversation, {settings['runs']} runs per level (medians), fake LLM: "
        f"{settings['ttft_ms']:g} ms to first token, {settings['tokens']} tokens {settings['token_ms']:g} ms apart; "
        f"conversations start over {settings['ramp_ms']:g} ms, next turn {settings['think_ms']:g} ms after "
        f"`response.end`; warm-up: {settings['warmup_conversations']} conversations of 2 turns"
    )


def machine_line(machine: dict[str, Any]) -> str:
    packages = machine["packages"]
    return (
        f"{machine['cpu']}, {machine['cores']} cores; {machine['os']}; {machine['python']}; "
        f"layercode-agent {packages['layercode-agent']} at {machine['commit']}, pydantic-ai "
        f"{packages['pydantic-ai-slim']}, fastapi {packages['fastapi']}, uvicorn {packages['uvicorn']}, "
        f"uvloop {packages['uvloop']}, httptools {packages['httptools']}, redis-py {packages['redis']}; "
        f"SQLite {machine['sqlite']} (database in {tempfile.gettempdir()}, {machine['tmp_filesystem']}); "
        f"Redis {machine['redis_server']}"
    )


def markdown_section(
    suites: list[Suite],
    scaling: tuple[Suite, Suite] | None,
    machine: dict[str, Any],
    settings: dict[str, Any],
    took: float,
    command: str,
    floor: Suite | None = None,
    chart: str | None = None,
) -> str:
    """The `## Results` section of BENCHMARKS.md, ready to paste; `chart` is the chart's path in the repository."""
    parts = [
        "## Results",
        "",
        f"Measured {machine['date']} with `{command}` ({took / 60:.1f} min).",
        "",
        f"- Machine: {machine_line(machine)}",
        f"- Settings: {settings_line(settings)}",
        "",
        LEGEND,
    ]
    if chart is not None:
        alt = "overhead p50, overhead p99 and CPU per turn against concurrent conversations, project vs floor"
        parts += ["", f"![{alt}]({chart})"]
    for suite in [floor, *suites] if floor is not None else suites:
        parts += ["", f"### {suite.title}: {suite.pinning}", "", markdown_table(suite, floor)]
        if suite.history is not None:
            parts += ["", history_line(suite.history) + "."]
        parts += [f"\nNote: {note}" for note in suite.notes]
    if scaling is not None:
        baseline, scaled = scaling
        parts += ["", f"### {scaled.store}: --workers {scaled.workers} vs 1", "", f"{scaled.pinning}.", ""]
        parts += [markdown_scaling(baseline, scaled, floor)]
        parts += [f"\nNote: {note}" for note in scaled.notes]
    return "\n".join(parts) + "\n"
