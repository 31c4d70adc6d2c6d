"""Typer commands. The server and the store are imported lazily inside the commands, so `sign` starts instantly."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from .. import __version__
from ..config import DevSecretError, get_settings
from . import conversations
from . import simulate as simulate_command
from . import tunnel as tunnel_command
from ._secret import SECRET_FILE_HELP, SECRET_HELP, reads_stdin, signing_secret

__all__ = ["app", "main", "run"]

app = typer.Typer(
    name="layercode-agent",
    help="The Python backend for Layercode voice agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(conversations.app, name="conversations")
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"layercode-agent {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """The Python backend for Layercode voice agents."""


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default PORT or 8000).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (default WORKERS or 1).")] = None,
    reload: Annotated[
        bool | None, typer.Option("--reload/--no-reload", help="Restart on code changes (UVICORN_RELOAD).")
    ] = None,
) -> None:
    """Start the webhook server."""
    from .serve import run_server

    settings = get_settings()
    run_server(
        settings,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers or settings.workers,
        reload=settings.uvicorn_reload if reload is None else reload,
        console=err,
    )


@app.command()
def sign(
    body: Annotated[
        str | None, typer.Argument(help="The exact request body to sign; '-' or omitted reads standard input.")
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the body from this file.")] = None,
    secret: Annotated[str | None, typer.Option(help=SECRET_HELP)] = None,
    secret_file: Annotated[Path | None, typer.Option(help=SECRET_FILE_HELP)] = None,
    timestamp: Annotated[int | None, typer.Option(help="Unix time to sign at (default now).")] = None,
) -> None:
    """Print a valid `layercode-signature` header value for a body, e.g. for curl."""
    from ..protocol import sign as sign_body

    body_from_stdin = file is None and (body is None or body == "-")
    if body_from_stdin and reads_stdin(secret, secret_file):
        raise typer.BadParameter(
            "the secret is read from standard input, so the body cannot come from standard input too: "
            "pass it as an argument or with --file",
            param_hint="--secret",
        )
    key, _ = signing_secret(secret, secret_file)
    if file is not None:
        raw = file.read_bytes()
    elif body_from_stdin:
        raw = sys.stdin.buffer.read()
    else:
        raw = (body or "").encode()
    # Only the header goes out: a timestamp and an HMAC, never the secret.
    typer.echo(sign_body(raw, key, timestamp=timestamp if timestamp is not None else int(time.time())))


@app.command()
def chat(
    url: Annotated[
        str | None, typer.Option(help="Webhook URL of any Layercode backend (default http://127.0.0.1:PORT/api/agent).")
    ] = None,
    secret: Annotated[str | None, typer.Option(help=SECRET_HELP)] = None,
    secret_file: Annotated[Path | None, typer.Option(help=SECRET_FILE_HELP)] = None,
    conversation_id: Annotated[str | None, typer.Option(help="Continue this conversation (default a new one).")] = None,
) -> None:
    """Talk to a running agent backend from the terminal, as Layercode would: streamed replies, barge-in.

    With the secret read from standard input, its first line is the secret and the rest the conversation.
    """
    from .chat import run_chat

    # Read before the chat starts reading standard input itself.
    key, source = signing_secret(secret, secret_file)
    raise typer.Exit(run_chat(url=url, secret=key, secret_source=source, conversation_id=conversation_id))


# `simulate` and `tunnel` live in their own modules, which import their heavy parts inside the commands.
app.command("simulate")(simulate_command.simulate)
app.command("tunnel")(tunnel_command.tunnel)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` and return its exit code (for tests and `python -m`).

    Click's standalone mode does the error handling: a usage error prints the usage and a one-line
    reason with exit code 2, Ctrl-C at a prompt exits 1, `typer.Exit(n)` exits n. Invalid settings
    exit 2 with one line per problem, instead of pydantic's traceback.
    """
    try:
        app(args=argv, prog_name="layercode-agent")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else 0 if code is None else 1
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        err.print(Text("Cannot start: invalid settings (environment or .env)", style="bold red"))
        for problem in _settings_problems(exc):
            err.print(Text(f"  {problem}"))
        return 2
    except DevSecretError as exc:  # A secret file to distrust, from any command: one line, never its text.
        err.print(Text(f"Cannot start: {exc}", style="bold red"))
        return 2
    return 0


def _settings_problems(exc: ValidationError) -> list[str]:
    """One line per problem: the variable and what is wrong, never the value given.

    pydantic's own message repeats the input, and for a model-level check that input is every setting,
    secrets included, unmasked.
    """
    problems: list[str] = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"]).upper()
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return problems


def run() -> None:
    """Console script entry point."""
    sys.exit(main())
