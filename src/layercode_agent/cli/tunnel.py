"""`layercode-agent tunnel`: expose the local server to Layercode's cloud with Layercode's own CLI.

Runs `npx @layercode/cli tunnel --agent-id ID --port P --path /api/agent` in the foreground: it opens a
cloudflared quick tunnel to `http://localhost:P` and points the agent's webhook URL at `<tunnel URL><path>`
(the URL changes on every start, and the CLI updates it each time). Before that it checks what would otherwise
fail later and less clearly: Node.js's `npx`, the agent id, and a server answering `/health` on that port.
Source: Layercode's "CLI Reference" (`tunnel [--agent-id] [--path] [--port] [--tail]`), summarised in
`/work/shared/layercode-protocol.md` section 5.1.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from types import FrameType
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from ..config import get_settings, resolve_webhook_secrets
from ._printable import printable

__all__ = ["layercode_cli_args", "tunnel"]

err = Console(stderr=True, highlight=False, soft_wrap=True)

_STOP_WAIT = 10.0
"""Seconds the Layercode CLI gets to stop after Ctrl-C before it is terminated."""
_HEALTH_TIMEOUT = 10.0
"""Seconds the local server gets to answer `/health` (a busy machine can be slow; a closed port fails at once)."""


def layercode_cli_args(agent_id: str, port: int, path: str) -> list[str]:
    """The arguments after `npx`: Layercode's CLI, its `tunnel` command and flags."""
    return ["@layercode/cli", "tunnel", "--agent-id", agent_id, "--port", str(port), "--path", path]


def tunnel(
    agent_id: Annotated[
        str | None, typer.Option("--agent-id", help="The Layercode agent to route (default LAYERCODE_AGENT_ID).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port of the local server (default PORT or 8000).")] = None,
    path: Annotated[str, typer.Option(help="Webhook path on the local server.")] = "/api/agent",
) -> None:
    """Expose the local server to Layercode through a tunnel and point the agent's webhook at it."""
    settings = get_settings()
    port = port or settings.port
    if not path.startswith("/"):
        _fail(f"--path must start with '/', e.g. /api/agent (got {path!r}).")
    npx = shutil.which("npx")
    if npx is None:
        _fail(
            "npx was not found on PATH. The tunnel runs Layercode's CLI with npx, which comes with Node.js: "
            "install Node.js (https://nodejs.org, or your package manager) and try again."
        )
    agent_id = agent_id or settings.layercode_agent_id
    if not agent_id:
        _fail(
            "No agent id: pass --agent-id or set LAYERCODE_AGENT_ID (in the environment or .env). "
            "It is shown on your agent's page in the Layercode dashboard."
        )
    health = f"http://127.0.0.1:{port}/health"
    if (problem := _health_problem(health)) is not None:
        _fail(
            f"No server answers {health} ({problem}). Start it first in another terminal with `make run` "
            f"(or `layercode-agent serve --port {port}`), or pass the --port it listens on."
        )
    if resolve_webhook_secrets(settings, create=False).source != "LAYERCODE_WEBHOOK_SECRET":
        err.print(
            Text(
                "Note: LAYERCODE_WEBHOOK_SECRET is not set, so the server checks signatures with the development "
                "secret, which Layercode does not know: its webhooks will get 401. Set it to the Webhook Secret "
                "shown in the dashboard and restart the server.",
                style="yellow",
            )
        )
    argv = [npx, *layercode_cli_args(agent_id, port, path)]
    err.print(Text(f"Running: npx {' '.join(argv[1:])}   (Ctrl-C stops it)", style="dim"))
    raise typer.Exit(_run(argv))


def _fail(message: str) -> NoReturn:
    err.print(Text(printable(message), style="red"))
    raise typer.Exit(2)


def _health_problem(url: str) -> str | None:
    """Why `url` does not answer 200, or `None` when it does."""
    import httpx

    try:
        response = httpx.get(url, timeout=_HEALTH_TIMEOUT)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None if response.status_code == 200 else f"HTTP {response.status_code}"


def _run(argv: list[str]) -> int:
    """Run the child in the foreground (it shares the terminal) and return its exit code, shell style.

    A Ctrl-C that lands while the child is being started (inside `Popen`, before there is a process to
    stop) is held until there is one, then stops it like any other: the child is never left running.
    """
    started: list[subprocess.Popen[bytes]] = []
    held = False

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal held
        if not started:
            held = True
            return
        raise KeyboardInterrupt

    # Only in place of Python's own handler: a SIGINT that is ignored (a job a script started in the
    # background) stays ignored, as the shell meant.
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        process = subprocess.Popen(argv)
        try:
            started.append(process)
            if held:
                raise KeyboardInterrupt
            code = process.wait()
        except KeyboardInterrupt:
            _stop(process)
            err.print(Text("Tunnel stopped.", style="dim"))
            return 130
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 128 - code if code < 0 else code


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the child after Ctrl-C: SIGINT (a terminal sent it one already), then SIGTERM, then SIGKILL."""
    try:
        # A terminal's Ctrl-C reaches the child too (same process group); when only we got it, pass it on.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=_STOP_WAIT)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(timeout=_STOP_WAIT)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):  # a second Ctrl-C, or it will not stop: no more waiting
        process.kill()
        process.wait()
