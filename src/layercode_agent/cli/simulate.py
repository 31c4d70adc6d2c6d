"""`layercode-agent simulate`: scripted conversations against a running backend, for regression tests and CI.

The scenario files, the runner and the results live in `layercode_agent.simulate`, imported inside the command so
`--help` stays instant; this module reads the options, prints the summary and writes the JUnit report. Exit codes:
0 when every expectation held, 1 when one failed, 2 for usage errors (a bad scenario file, no secret, a server
that does not answer). What the backend sent is printed through `printable`: a control sequence in a reply or an
event type is shown as an escape, never obeyed by the terminal.
"""

from __future__ import annotations

import asyncio
import re
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..config import get_settings
from ._printable import printable
from ._secret import SECRET_FILE_HELP, SECRET_HELP, signing_secret

if TYPE_CHECKING:
    from ..simulate import Scenario, ScenarioResult, StepResult

__all__ = ["junit_xml", "simulate"]

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_REPLY_CHARS = 300
"""Longest reply quoted under a failure (the JUnit report has it whole)."""


def simulate(
    scenarios: Annotated[
        list[Path] | None, typer.Argument(help="Scenario YAML files.", metavar="SCENARIO.yaml...", show_default=False)
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Webhook URL to speak to (default http://127.0.0.1:PORT/api/agent).")
    ] = None,
    secret: Annotated[str | None, typer.Option(help=SECRET_HELP)] = None,
    secret_file: Annotated[Path | None, typer.Option(help=SECRET_FILE_HELP)] = None,
    concurrency: Annotated[int, typer.Option(help="Scenarios run at the same time (at least 1).")] = 4,
    junit: Annotated[Path | None, typer.Option(help="Also write a JUnit XML report to this file.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds any one request may wait for the network.")] = 60.0,
) -> None:
    """Play scripted conversations against a backend exactly as Layercode would, and check the answers."""
    from ..simulate import ScenarioError, check_reachable, load_scenarios, run_scenarios

    # Checked here rather than by the option parser, so each is one clear line and exit code 2.
    if not scenarios:
        _usage("Name at least one scenario file, e.g. `layercode-agent simulate examples/scenarios/*.yaml`.")
    if concurrency < 1:
        _usage(f"--concurrency must be at least 1 (got {concurrency}).")
    if timeout <= 0:
        _usage(f"--timeout must be a positive number of seconds (got {timeout:g}).")
    loaded: list[Scenario] = []
    problems: list[str] = []
    for path in scenarios:
        try:
            loaded.extend(load_scenarios(path))
        except ScenarioError as exc:
            problems.append(str(exc))
    if problems:
        err.print(Text("Invalid scenario file:", style="bold red"))
        for problem in problems:
            err.print(Text(printable(problem)))
        raise typer.Exit(2)
    if url is None:
        url = f"http://127.0.0.1:{get_settings().port}/api/agent"
    elif not re.match(r"https?://[^/]", url):
        _usage(f"--url must be an http:// or https:// URL, not {url!r}.")
    key, _ = signing_secret(secret, secret_file)
    if (problem := asyncio.run(check_reachable(url, request_timeout=min(timeout, 10.0)))) is not None:
        _usage(f"Cannot reach {url}: {problem}. Is the server running? Start it with `make run`, or pass --url.")

    count = len(loaded)
    out.print(
        Text(
            f"Simulating {count} scenario{'' if count == 1 else 's'} against {url} (concurrency {concurrency})",
            style="bold",
        )
    )
    started = time.perf_counter()
    try:
        results = asyncio.run(
            run_scenarios(
                loaded, url=url, secret=key, concurrency=concurrency, request_timeout=timeout, on_result=_progress
            )
        )
    except KeyboardInterrupt:
        err.print(Text("Interrupted: no summary, no report.", style="yellow"))
        raise typer.Exit(130) from None
    _print_summary(results, time.perf_counter() - started)
    if junit is not None:
        try:
            junit.parent.mkdir(parents=True, exist_ok=True)
            junit.write_text(junit_xml(results), encoding="utf-8")
        except OSError as exc:
            _usage(f"Cannot write the JUnit report {junit}: {exc.strerror or exc}")
        out.print(Text(f"JUnit report: {junit}", style="dim"))
    raise typer.Exit(0 if all(result.passed for result in results) else 1)


def _usage(message: str) -> NoReturn:
    err.print(Text(printable(message), style="red"))
    raise typer.Exit(2)


# --- Printing ---------------------------------------------------------------------------------------


def _progress(result: ScenarioResult) -> None:
    verdict = Text(" PASS ", style="bold green") if result.passed else Text(" FAIL ", style="bold red")
    failed = len(result.failed_steps)
    steps = f"{len(result.steps)} steps" if not failed else f"{failed} of {result.planned} steps failed"
    out.print(
        Text.assemble(verdict, " ", (printable(result.name), "bold"), f"  {steps}, {_seconds(result.duration_ms)}")
    )


def _print_summary(results: Sequence[ScenarioResult], elapsed_s: float) -> None:
    table = Table(title="Scenarios", title_justify="left", header_style="bold", show_lines=False)
    table.add_column("scenario", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("failed", justify="right", no_wrap=True)
    table.add_column("first token p50", justify="right", no_wrap=True)
    table.add_column("max", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("result", overflow="fold")
    for result in results:
        failures = result.failures
        table.add_row(
            Text(printable(result.name)),
            f"{sum(step.passed for step in result.steps)}/{result.planned}",
            Text(str(len(result.failed_steps)), style="red" if result.failed_steps else ""),
            _ms(result.first_token_p50),
            _ms(result.first_token_max),
            _seconds(result.duration_ms),
            Text("pass", style="green") if result.passed else Text(printable(failures[0]), style="red"),
        )
    out.print()
    out.print(table)
    failed = [result for result in results if not result.passed]
    if failed:
        out.print()
        out.print(Text("Failures", style="bold red"))
        for result in failed:
            _print_failure(result)
    out.print()
    summary = (
        f"{len(results)} scenario{'' if len(results) == 1 else 's'}: "
        f"{len(results) - len(failed)} passed, {len(failed)} failed in {elapsed_s:.1f} s"
    )
    out.print(Text(summary, style="bold red" if failed else "bold green"))


def _print_failure(result: ScenarioResult) -> None:
    out.print(
        Text.assemble(
            ("✗ ", "red"),
            (printable(result.name), "bold"),
            (printable(f"  {result.source}  conversation {result.conversation_id}"), "dim"),
        ),
        soft_wrap=True,
    )
    for step in result.failed_steps:
        for reason in step.failures:
            out.print(Text.assemble("  ", (printable(step.title), "bold"), ": ", printable(reason)), soft_wrap=True)
        if step.text:
            said = step.text if len(step.text) <= _REPLY_CHARS else step.text[: _REPLY_CHARS - 1] + "…"
            what = "heard" if step.interrupted else "got"
            out.print(Text(printable(f"    {what}: {said!r}"), style="dim"), soft_wrap=True)
    if len(result.steps) < result.planned:
        out.print(Text(f"  {result.planned - len(result.steps)} later step(s) not run", style="dim"), soft_wrap=True)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _seconds(ms: float) -> str:
    return f"{ms / 1000:.1f} s"


# --- JUnit XML --------------------------------------------------------------------------------------

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""Characters XML 1.0 cannot carry (control characters a backend might send), replaced before writing."""


def junit_xml(results: Sequence[ScenarioResult], *, suite: str = "layercode-agent simulate") -> str:
    """A JUnit XML report: one `testsuite`, one `testcase` per scenario, a `failure` in each failed one.

    Each test case's `system-out` holds the conversation step by step, so a CI page shows what was said.
    """

    def clean(text: str) -> str:
        return _NOT_XML.sub("\ufffd", text)

    root = ElementTree.Element(
        "testsuite",
        name=suite,
        tests=str(len(results)),
        failures=str(sum(not result.passed for result in results)),
        errors="0",
        skipped="0",
        time=f"{sum(result.duration_ms for result in results) / 1000:.3f}",
        timestamp=datetime.now(UTC).replace(microsecond=0, tzinfo=None).isoformat(),
    )
    for result in results:
        case = ElementTree.SubElement(
            root,
            "testcase",
            classname=clean(Path(result.source).stem or "simulate"),
            name=clean(result.name),
            time=f"{result.duration_ms / 1000:.3f}",
        )
        if not result.passed:
            failures = result.failures
            failure = ElementTree.SubElement(case, "failure", message=clean(failures[0]), type="ExpectationFailed")
            failure.text = clean("\n".join(failures))
        ElementTree.SubElement(case, "system-out").text = clean("\n".join(_step_line(step) for step in result.steps))
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def _step_line(step: StepResult) -> str:
    facts = [f"status {step.status}" if step.status is not None else "no answer"]
    if step.first_token_ms is not None:
        facts.append(f"first token {step.first_token_ms:.0f} ms")
    if step.total_ms is not None:
        facts.append(f"total {step.total_ms:.0f} ms")
    if step.interrupted:
        facts.append("interrupted")
    verdict = "ok" if step.passed else "FAILED: " + "; ".join(step.failures)
    return f"{step.title} [{', '.join(facts)}] {verdict}\n    {step.text!r}"
