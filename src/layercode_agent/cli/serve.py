"""`layercode-agent serve`: check the configuration, print the banner, run uvicorn.

The banner names the model, the store, the routes and where the webhook secret came from; it never
prints a secret. Configuration errors (unknown model, missing key, bad store URL) stop here with
one clear line instead of a traceback from every worker.

SIGTERM stops the server cleanly: each worker drains its reply streams (`server/shutdown.py`), then
uvicorn shuts down, and the process exits with status 0.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import typer
import uvicorn
from rich.console import Console
from rich.table import Table
from uvicorn.config import LOGGING_CONFIG

from ..config import Settings, resolve_webhook_secrets
from ..redact import redact_url
from ..server.http import PROTOCOL

__all__ = ["MULTIPROC_ENV", "authorize_mode", "log_config", "metrics_dir", "run_server"]

FACTORY = "layercode_agent.server.app:create_app_from_env"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client's workers keep their numbers; it reads it when first imported."""
GRACEFUL_AFTER_DRAIN = 5
"""Seconds uvicorn waits for requests still open once the reply streams have ended, before cancelling them."""
WORKER_HEALTHCHECK = 30
"""Seconds a worker of `--workers N` may take to answer the supervisor's ping before it is killed and replaced.

Uvicorn's 5 s is less than a new worker needs to start Python and import uvicorn on a busy machine (a
container with a small CPU share): it is killed before it could answer, again and again.
"""


def log_config(level: str) -> dict[str, Any]:
    """Uvicorn's logging config, extended so the project's own loggers print too."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["layercode_agent"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def _check(settings: Settings, workers: int) -> tuple[str, str]:
    from ..server.app import model_choice

    if settings.agent:
        from ..agent import load_user_agent

        agent = load_user_agent(settings.agent)
        model = f"{agent.model} (from AGENT={settings.agent})"
        if settings.agent_model not in ("", "auto") or agent.model is None:
            model = model_choice(settings).name + f" with AGENT={settings.agent}"
    else:
        model = model_choice(settings).name
    url = settings.store_url
    if url.startswith("memory://") and workers > 1:
        raise ValueError(
            "CONVERSATION_STORE=memory:// keeps history inside one process; with --workers > 1 every worker "
            "would hold a different history. Use the default SQLite store (or Redis) for several workers."
        )
    return model, url


def metrics_dir(settings: Settings, *, port: int, workers: int, reload: bool) -> tuple[Path | None, bool]:
    """Prepare `PROMETHEUS_MULTIPROC_DIR` for several workers; return it and whether it is this run's own.

    A directory the user set is used as it is. Otherwise `--workers` above 1 gets a fresh, empty
    `DATA_DIR/prometheus/PORT` (one per port, so two servers sharing a data folder never mix their
    numbers). It is set in this process's environment before uvicorn spawns the workers, so each
    worker's prometheus_client starts in multiprocess mode. One process needs none.
    """
    if not settings.metrics:
        return None, False
    if given := os.environ.get(MULTIPROC_ENV):
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    if reload or workers <= 1:
        return None, False
    path = (settings.data_dir / "prometheus" / str(port)).resolve()
    shutil.rmtree(path, ignore_errors=True)  # Numbers of an earlier run would add up with this one's.
    settings.data_dir.mkdir(
        parents=True, exist_ok=True, mode=0o700
    )  # Created here first: as private as the store makes it.
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path, True


def authorize_mode(settings: Settings) -> str:
    """Who `/api/authorize` answers, for the banner."""
    if settings.layercode_api_key is None or not settings.layercode_agent_id:
        return "off until LAYERCODE_API_KEY and LAYERCODE_AGENT_ID are set"
    if settings.authorize_hook:
        who = f"callers AUTHORIZE_HOOK={settings.authorize_hook} admits"
    elif settings.authorize_token is not None:
        who = "callers with the AUTHORIZE_TOKEN"
    else:
        who = "loopback clients only: set AUTHORIZE_TOKEN or AUTHORIZE_HOOK for others"
    limit = settings.rate_limit
    return f"{who}; {limit} each" if limit is not None else f"{who}; no rate limit"


@contextmanager
def _sigterm_exits_cleanly() -> Generator[None]:
    """Make SIGTERM end `serve` with status 0 rather than kill it.

    Uvicorn raises the signal it shut down on again once it is done, to die by it; SIGTERM is how an
    orchestrator stops a server on purpose, and by then every stream has been drained: a normal exit.
    A SIGTERM before uvicorn's own handler is installed (while the app loads) exits the same way.
    """

    def exit_cleanly(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_server(settings: Settings, *, host: str, port: int, workers: int, reload: bool, console: Console) -> None:
    """Validate, print the banner and serve until interrupted."""
    try:
        model, store_url = _check(settings, workers)
        secrets = resolve_webhook_secrets(settings)
        metrics_path, own_metrics_path = metrics_dir(settings, port=port, workers=workers, reload=reload)
    except Exception as exc:
        console.print(f"[bold red]Cannot start:[/] {exc}")
        raise typer.Exit(2) from exc
    base = f"http://{'localhost' if host in ('127.0.0.1', '0.0.0.0', '::') else host}:{port}"
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("model", model)
    table.add_row("store", redact_url(store_url))
    table.add_row("webhook secret", secrets.source)
    table.add_row("webhook", f"POST {base}/api/agent")
    table.add_row("authorize", f"POST {base}/api/authorize ({authorize_mode(settings)})")
    table.add_row("health", f"GET  {base}/health")
    table.add_row("ready", f"GET  {base}/ready (503 while the store does not answer)")
    if not settings.metrics:
        table.add_row("metrics", "off (METRICS=false)")
    else:
        across = "" if metrics_path is None else f" (sum of {workers} workers)" if workers > 1 else " (multiprocess)"
        table.add_row("metrics", f"GET  {base}/metrics{across}")
    if settings.admin_token is not None:
        table.add_row("conversations", f"GET  {base}/api/conversations (Bearer ADMIN_TOKEN)")
    if settings.playground:
        from ..server.routes.playground import PLAYGROUND_PATH, playground_refusal

        refusal = playground_refusal(host)
        page_host = "localhost" if host in ("127.0.0.1", "localhost") else f"[{host}]" if ":" in host else host
        table.add_row(
            "playground", f"http://{page_host}:{port}{PLAYGROUND_PATH}" if refusal is None else f"off: {refusal}"
        )
    table.add_row("workers", str(workers) + (" (reload)" if reload else ""))
    console.print("[bold]layercode-agent[/] is starting")
    console.print(table)
    if secrets.source.startswith("development"):
        console.print(
            "[dim]No LAYERCODE_WEBHOOK_SECRET is set: webhooks must be signed with the development secret "
            "(`layercode-agent sign` uses it).[/]"
        )
    # The factory re-reads the settings; it must see the interface actually bound (--host may differ from
    # HOST), since that decides whether the playground may be mounted.
    os.environ["HOST"] = host
    logging.getLogger("layercode_agent").debug("starting uvicorn with factory %s", FACTORY)
    try:
        with _sigterm_exits_cleanly():
            uvicorn.run(
                FACTORY,
                factory=True,
                host=host,
                port=port,
                workers=None if reload else workers,
                reload=reload,
                log_config=log_config(settings.log_level),
                log_level=settings.log_level,
                # Reply streams were drained and ended before uvicorn's shutdown begins (SHUTDOWN_DRAIN_SECONDS);
                # this bounds only what is left then: a slow data handler, a client still sending its request.
                timeout_graceful_shutdown=GRACEFUL_AFTER_DRAIN,
                timeout_worker_healthcheck=WORKER_HEALTHCHECK,
                # Uvicorn's httptools protocol plus head size and read deadlines (MAX_HEADER_BYTES,
                # REQUEST_READ_TIMEOUT).
                http=PROTOCOL,
            )
    finally:
        if own_metrics_path and metrics_path is not None:
            shutil.rmtree(metrics_path, ignore_errors=True)
