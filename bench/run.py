"""`python -m bench`: start the fake LLM, the floor, the stores and the real server, pinned; load each; report.

First the floor (`bench.floor`, a framework-free backend on the server's core) and then, for each store, one
server is started and warmed up; then for each level C, `--runs` times, C conversations of
`--turns` turns run at once and the run's figures are taken (see `_figures`). Each run's history is checked in the
store afterwards. The tables show each figure's median over the runs. With `--scale-workers N`, the
`--scale-store` is also measured under `serve --workers N` at `--scale-levels`, against `--workers 1`. Every table
shows the project's figures with their ratio to the floor's at the same level; `--chart` draws them.

Exit status: 0 when every turn was answered and stored correctly, 1 when any was lost, 2 on bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from rich.console import Console

from ._chart import chart_svg
from ._figures import (
    HISTORY_SPAN,
    CPUWindow,
    HistoryGrowth,
    LevelResult,
    RunFigures,
    Suite,
    history_growth,
    run_figures,
)
from ._history import check_history
from ._procs import (
    REPO,
    FakeLLMProcess,
    FloorProcess,
    Pinning,
    RedisProcess,
    ServerProcess,
    available_cores,
    cpu_seconds,
    machine_busy_seconds,
    peak_rss_mib,
    pin_self,
    plan_pinning,
    run_async,
)
from ._report import machine_info, machine_line, markdown_section, settings_line
from ._tables import LEGEND, history_line, rich_scaling, rich_table
from .load import ConnectionPool, LoadTarget, run_conversations

__all__ = ["main"]

STORES = ("memory", "sqlite", "redis")
_DISTURBED = 10.0
"""Above this CPU use (% of a core) by processes outside the bench, a run is measured again (`--retries`)."""
_BUSY_LOAD_CORE = 80.0
"""Above this load-core use (%), a level's overhead may include the load generator's own queueing."""
_T = TypeVar("_T")


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _stores(text: str) -> list[str]:
    stores = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [store for store in stores if store not in STORES]
    if unknown or not stores:
        raise argparse.ArgumentTypeError(f"stores are {', '.join(STORES)}; got {text!r}")
    return stores


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; defaults are the full bench of `make bench`."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--stores", type=_stores, default=list(STORES), help="memory,sqlite,redis (default all)")
    parser.add_argument("--levels", type=_ints, default=[1, 10, 50, 100], help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation (default 5)")
    parser.add_argument("--runs", type=int, default=3, help="runs per level; tables show medians (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="serve --workers N, pinned to N cores (default 1)")
    parser.add_argument("--ttft-ms", type=float, default=200.0, help="fake LLM time to first token (default 200)")
    parser.add_argument("--tokens", type=int, default=60, help="fake LLM tokens per reply (default 60)")
    parser.add_argument("--token-ms", type=float, default=10.0, help="fake LLM time between tokens (default 10)")
    parser.add_argument(
        "--ramp-ms", type=float, default=None, help="spread conversation starts over this long (default: one turn)"
    )
    parser.add_argument("--think-ms", type=float, default=0.0, help="pause between a reply's end and the next turn")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up conversations of 2 turns (default 10)")
    parser.add_argument(
        "--history-exchanges",
        type=int,
        default=40,
        help="also time webhook -> LLM request through one conversation of this many exchanges and 5 more; 0: skip",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a turn may take (default 60)")
    parser.add_argument(
        "--retries", type=int, default=2, help="measure a run again when other processes used the CPU (default 2)"
    )
    parser.add_argument("--scale-workers", type=int, default=2, help="also measure serve --workers N; 0: skip")
    parser.add_argument("--scale-levels", type=_ints, default=[50, 100], help="levels for the workers comparison")
    parser.add_argument("--scale-store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--json", type=Path, help="write every figure (each run, medians, machine) here")
    parser.add_argument("--markdown", type=Path, help="write the results section of BENCHMARKS.md here")
    parser.add_argument(
        "--chart",
        type=Path,
        action="append",
        default=[],
        help="write the chart (SVG: overhead p50/p99 and CPU per turn, project vs floor) here; repeatable",
    )
    floor = parser.add_mutually_exclusive_group()
    floor.add_argument("--no-floor", action="store_true", help="do not measure the floor (no ratios in the tables)")
    floor.add_argument("--floor-only", action="store_true", help="measure only the floor (no project server)")
    args = parser.parse_args(argv)
    for name in ("turns", "runs", "workers", "tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.retries < 0 or args.history_exchanges < 0:
        parser.error("--retries and --history-exchanges must be 0 or more")
    if args.workers > 1 and "memory" in args.stores:
        parser.error("memory:// keeps history in one process: use --workers 1 with it, or --stores sqlite,redis")
    return args


# --- Measuring ------------------------------------------------------------------------------------


@dataclass
class _Parties:
    fake: FakeLLMProcess
    server: ServerProcess | FloorProcess
    redis: RedisProcess | None
    pinning: Pinning


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure_level(
    args: argparse.Namespace, parties: _Parties, pool: ConnectionPool, control: httpx.AsyncClient, level: int, run: int
) -> RunFigures:
    server, fake, redis = parties.server, parties.fake, parties.redis
    ramp = _ramp_seconds(args)
    await control.get("/stats", params={"reset": "1"})
    pids = server.pids()
    before = (cpu_seconds(pids), cpu_seconds([fake.pid]), _client_cpu(), cpu_seconds([redis.pid]) if redis else 0.0)
    machine_before = machine_busy_seconds()
    started = time.monotonic()
    conversations = await run_conversations(
        LoadTarget("127.0.0.1", server.port, server.secret, timeout=args.timeout),
        concurrency=level,
        turns=args.turns,
        tokens=args.tokens,
        tag=f"c{level}r{run}_{uuid.uuid4().hex[:6]}",
        ramp=ramp,
        think=args.think_ms / 1000,
        pool=pool,
    )
    wall = time.monotonic() - started
    await asyncio.sleep(0.1)  # Anything the server still does after the last response.end belongs to this run.
    pids = server.pids()
    after = (cpu_seconds(pids), cpu_seconds([fake.pid]), _client_cpu(), cpu_seconds([redis.pid]) if redis else 0.0)
    machine = machine_busy_seconds() - machine_before
    cpu = CPUWindow(
        server=after[0] - before[0],
        fake=after[1] - before[1],
        client=after[2] - before[2],
        store=after[3] - before[3] if redis else None,
        machine=machine,
        wall=wall,
        load_cores=len(parties.pinning.load or [0]),
    )
    timings = await _llm_timings(control)
    defects = await check_history(
        conversations, store_url=server.store_url, server_base=server.base, admin_token=server.admin_token
    )
    return run_figures(
        conversations, timings, ttft_ms=args.ttft_ms, cpu=cpu, rss_mib=peak_rss_mib(pids), defects=defects
    )


async def _llm_timings(control: httpx.AsyncClient) -> dict[str, tuple[float, float | None]]:
    """The fake's `(request received, first token sent)` per request key since the last reset; resets them."""
    stats = (await control.get("/stats", params={"reset": "1"})).json()
    timings: dict[str, tuple[float, float | None]] = {}
    for key, received, first_token, *_ in stats["timings"]:
        timings.setdefault(key, (received, first_token))
    return timings


def _ramp_seconds(args: argparse.Namespace) -> float:
    if args.ramp_ms is not None:
        return args.ramp_ms / 1000
    return (args.ttft_ms + (args.tokens - 1) * args.token_ms) / 1000


async def _measure_suite(
    args: argparse.Namespace, parties: _Parties, suite: Suite, levels: list[int], console: Console
) -> None:
    server = parties.server
    target = LoadTarget("127.0.0.1", server.port, server.secret, timeout=args.timeout)
    pool = ConnectionPool(target)
    async with httpx.AsyncClient(base_url=parties.fake.base, timeout=30) as control:
        try:
            if args.warmup:
                await run_conversations(
                    target,
                    concurrency=args.warmup,
                    turns=2,
                    tokens=args.tokens,
                    tag=f"warmup_{uuid.uuid4().hex[:6]}",
                    ramp=_ramp_seconds(args),
                    pool=pool,
                )
            for level in levels:
                result = LevelResult(concurrency=level)
                suite.levels.append(result)
                for run in range(args.runs):
                    result.runs.append(await _measure_run(args, parties, pool, control, suite, level, run, console))
                _note_level(suite, result)
            if args.history_exchanges:
                suite.history = await _measure_history(args, target, pool, control)
                console.print(f"  {suite.title}: {history_line(suite.history)}", highlight=False)
        finally:
            pool.close()


async def _measure_history(
    args: argparse.Namespace, target: LoadTarget, pool: ConnectionPool, control: httpx.AsyncClient
) -> HistoryGrowth:
    """Webhook → LLM request through one conversation of `--history-exchanges` exchanges and `HISTORY_SPAN` more."""
    await control.get("/stats", params={"reset": "1"})
    (conversation,) = await run_conversations(
        target,
        concurrency=1,
        turns=args.history_exchanges + HISTORY_SPAN,
        tokens=args.tokens,
        tag=f"history_{uuid.uuid4().hex[:6]}",
        ramp=0.0,
        think=args.think_ms / 1000,
        pool=pool,
    )
    timings = await _llm_timings(control)
    return history_growth(conversation, timings, args.history_exchanges)


async def _measure_run(
    args: argparse.Namespace,
    parties: _Parties,
    pool: ConnectionPool,
    control: httpx.AsyncClient,
    suite: Suite,
    level: int,
    run: int,
    console: Console,
) -> RunFigures:
    """One run, measured again (up to `--retries` times) while other processes load the machine."""
    for attempt in range(args.retries + 1):
        figures = await _measure_level(args, parties, pool, control, level, run)
        console.print(
            f"  {suite.title} C={level} run {run + 1}/{args.runs}: "
            f"overhead p50 {_fmt(figures.overhead_p50)} ms, p99 {_fmt(figures.overhead_p99)} ms, "
            f"CPU/turn {_fmt(figures.cpu_ms_per_turn, 2)} ms, {_fmt(figures.turns_per_s)} turns/s, "
            f"load core {_fmt(figures.load_core_pct, 0)}%, errors {figures.errors}, defects {figures.defects}, "
            f"other processes {_fmt(figures.other_cpu_pct, 0)}%",
            highlight=False,
        )
        for sample in figures.error_samples + figures.defect_samples:
            console.print(f"    [red]{sample}[/]", highlight=False)
        if (figures.other_cpu_pct or 0.0) <= _DISTURBED or attempt == args.retries:
            return figures
        console.print("    [yellow]disturbed by processes outside the bench: measuring this run again[/]")
    raise AssertionError("unreachable")


def _note_level(suite: Suite, result: LevelResult) -> None:
    level = result.concurrency
    disturbed = max((run.other_cpu_pct or 0.0) for run in result.runs)
    if disturbed > _DISTURBED:
        suite.notes.append(
            f"at C={level}, processes outside the bench used up to {disturbed:.0f}% of a core: "
            "the figures there may be disturbed"
        )
    busiest = max((run.load_core_pct or 0.0) for run in result.runs)
    if busiest > _BUSY_LOAD_CORE:
        suite.notes.append(
            f"at C={level}, the load generator's core was {busiest:.0f}% busy: "
            "its own delays may be part of the overhead there"
        )


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def run_suite(args: argparse.Namespace, store: str, workers: int, levels: list[int], console: Console) -> Suite:
    """Start everything for one store (or `"floor"`) and worker count, measure every level, stop everything."""
    pinning = plan_pinning(workers, pin=not args.no_pin)
    pin_self(pinning.load)
    with contextlib.ExitStack() as stack:
        fake = FakeLLMProcess(ttft_ms=args.ttft_ms, tokens=args.tokens, token_ms=args.token_ms, cores=pinning.load)
        stack.callback(fake.stop)
        redis: RedisProcess | None = None
        if store == "floor":
            store_url = FloorProcess.store_url
        elif store == "redis":
            redis = RedisProcess(pinning.load)
            stack.callback(redis.stop)
            store_url = f"{redis.url}?prefix=bench:"
        elif store == "sqlite":
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sqlite-"))
            store_url = f"sqlite:///{Path(directory) / 'bench.db'}"
        else:
            store_url = "memory://"
        where = pinning.describe(redis=redis is not None, backend="floor" if store == "floor" else "server")
        console.print(f"[bold]{store}[/] with {workers} worker(s): {where}", highlight=False)
        server: ServerProcess | FloorProcess
        if store == "floor":
            server = FloorProcess(llm_base_url=fake.base_url, cores=pinning.server)
        else:
            server = ServerProcess(
                store_url=store_url, llm_base_url=fake.base_url, workers=workers, cores=pinning.server
            )
        stack.callback(server.stop)
        notes = [*pinning.notes]
        if fake.loop != "uvloop":
            notes.append(f"the fake LLM runs on the {fake.loop} event loop (uvloop is not installed)")
        suite = Suite(store=store, store_url=store_url, workers=workers, pinning=where, notes=notes)
        run_async(_measure_suite(args, _Parties(fake, server, redis, pinning), suite, levels, console))
    return suite


# --- Reporting -------------------------------------------------------------------------------------


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the figures were taken with."""
    return {
        "stores": args.stores,
        "levels": args.levels,
        "turns": args.turns,
        "runs": args.runs,
        "workers": args.workers,
        "ttft_ms": args.ttft_ms,
        "tokens": args.tokens,
        "token_ms": args.token_ms,
        "ramp_ms": _ramp_seconds(args) * 1000,
        "think_ms": args.think_ms,
        "warmup_conversations": args.warmup,
        "history_exchanges": args.history_exchanges,
        "retries": args.retries,
        "scale_workers": args.scale_workers,
        "scale_levels": args.scale_levels,
        "scale_store": args.scale_store,
        "floor": not args.no_floor,
        "floor_only": args.floor_only,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; see the module docstring for the exit status."""
    args = parse_args(argv)
    terminal = Console()
    # Piped into a file or CI log, rich would wrap the wide tables at 80 columns.
    console = terminal if terminal.is_terminal else Console(width=200)
    machine = machine_info()
    settings = settings_of(args)
    console.print(f"[bold]Machine[/]: {machine_line(machine)}", highlight=False)
    console.print(f"[bold]Settings[/]: {settings_line(settings)}", highlight=False)
    began = time.monotonic()
    floor: Suite | None = None
    if not args.no_floor:
        floor = run_suite(args, "floor", 1, args.levels, console)
        console.print(rich_table(floor))
    suites: list[Suite] = []
    for store in [] if args.floor_only else args.stores:
        suite = run_suite(args, store, args.workers, args.levels, console)
        suites.append(suite)
        console.print(rich_table(suite, floor))
    scaling: tuple[Suite, Suite] | None = None
    if args.scale_workers > 1 and not args.floor_only:
        scaling = _scaling(args, suites, console, floor)
    took = time.monotonic() - began
    console.print()
    for suite in [floor, *suites] if floor is not None else suites:
        console.print(rich_table(suite, floor))
        if suite.history is not None:
            console.print(history_line(suite.history), highlight=False)
        for note in suite.notes:
            console.print(f"[dim]Note: {note}[/]", highlight=False)
    if scaling is not None:
        console.print(rich_scaling(*scaling, floor))
        for note in scaling[1].notes:
            console.print(f"[dim]Note: {note}[/]", highlight=False)
    console.print(f"[dim]{LEGEND}[/]", highlight=False)
    console.print(f"Took {took / 60:.1f} min.", highlight=False)
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    # The workers table's baseline is one of `suites` unless it had to be measured on its own.
    everything = suites + [suite for suite in scaling or () if all(suite is not other for other in suites)]
    if args.json is not None:
        document = {
            "command": command,
            "machine": machine,
            "settings": settings,
            "took_s": took,
            "floor": floor.as_json() if floor is not None else None,
            "suites": [suite.as_json(floor) for suite in everything],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if args.chart:
        svg = chart_svg(suites, floor)
        for path in args.chart:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(svg, encoding="utf-8")
            console.print(f"Chart: {path}", highlight=False)
    if args.markdown is not None:
        section = markdown_section(suites, scaling, machine, settings, took, command, floor, _chart_link(args.chart))
        args.markdown.write_text(section, encoding="utf-8")
    measured = everything + ([floor] if floor is not None else [])
    lost = any(level.summary.errors or level.summary.defects for suite in measured for level in suite.levels)
    return 1 if lost else 0


def _chart_link(charts: list[Path]) -> str | None:
    """The chart's path relative to the repository, for BENCHMARKS.md (one outside test-artifacts/ preferred)."""
    inside = [path.resolve() for path in charts if path.resolve().is_relative_to(REPO)]
    inside.sort(key=lambda path: path.is_relative_to(REPO / "test-artifacts"))
    return inside[0].relative_to(REPO).as_posix() if inside else None


def _scaling(
    args: argparse.Namespace, suites: list[Suite], console: Console, floor: Suite | None
) -> tuple[Suite, Suite] | None:
    store, workers, levels = args.scale_store, args.scale_workers, args.scale_levels
    if len(available_cores()) < workers:
        console.print(f"[yellow]Skipping --workers {workers}: fewer than {workers} cores are available.[/]")
        return None
    baseline = next(
        (
            suite
            for suite in suites
            if suite.store == store
            and suite.workers == 1
            and set(levels) <= {level.concurrency for level in suite.levels}
        ),
        None,
    )
    if baseline is None:
        baseline = run_suite(args, store, 1, levels, console)
    scaled = run_suite(args, store, workers, levels, console)
    console.print(rich_scaling(baseline, scaled, floor))
    return baseline, scaled


if __name__ == "__main__":
    sys.exit(main())
