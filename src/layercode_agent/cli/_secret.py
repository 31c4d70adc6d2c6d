"""Where `sign`, `chat` and `simulate` get the webhook secret they sign with.

Why: an argument such as `--secret whsec_...` is visible to every user of the machine (`ps`,
`/proc/PID/cmdline`) and stays in the shell's history. So the secret can also come from a file
(`--secret-file PATH`), from standard input (`--secret -` or `--secret-file -`: the first line, or a
prompt without echo on a terminal), or, with no option, from `LAYERCODE_WEBHOOK_SECRET` in the environment
or `.env`, and last from the development secret the server created in `DATA_DIR`.

Standard input is read one byte at a time, up to the end of the first line: `chat` reads the conversation
from the same descriptor afterwards, and nothing of it may be swallowed by a buffer.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Final

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.text import Text

from ..config import get_settings, resolve_webhook_secrets

__all__ = ["SECRET_FILE_HELP", "SECRET_HELP", "STDIN", "reads_stdin", "signing_secret"]

STDIN: Final = "-"
"""The value of `--secret` or `--secret-file` that means standard input."""

SECRET_HELP: Final = (
    "Webhook secret to sign with; '-' reads it from standard input. Any user can see an argument in `ps`: "
    "prefer --secret-file, or LAYERCODE_WEBHOOK_SECRET in the environment or .env, which is the default "
    "(then the development secret the server created)."
)
SECRET_FILE_HELP: Final = (
    "Read the webhook secret from this file; '-' reads the first line of standard input "
    "(on a terminal, a prompt that does not echo)."
)


def reads_stdin(secret: str | None, secret_file: Path | None) -> bool:
    """Whether the options take the secret from standard input."""
    return secret == STDIN or (secret_file is not None and str(secret_file) == STDIN)


def signing_secret(secret: str | None, secret_file: Path | None) -> tuple[SecretStr, str]:
    """The secret to sign with and where it came from, in words for a banner (never the secret itself).

    Raises:
        typer.BadParameter: `--secret` and `--secret-file` together, or one that gives no usable secret.
        typer.Exit: With code 2 and a line on standard error, when nothing is configured either.
    """
    if secret is not None and secret_file is not None:
        raise typer.BadParameter("pass --secret or --secret-file, not both", param_hint="--secret")
    if reads_stdin(secret, secret_file):
        return SecretStr(_from_stdin()), "standard input"
    if secret is not None:
        if not secret.strip():
            raise typer.BadParameter("the secret is empty", param_hint="--secret")
        return SecretStr(secret.strip()), "--secret"
    if secret_file is not None:
        return SecretStr(_from_file(secret_file)), f"--secret-file {secret_file}"
    secrets = resolve_webhook_secrets(get_settings(), create=False)
    if not secrets.values:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            Text.assemble(
                ("No webhook secret: ", "red"),
                "set LAYERCODE_WEBHOOK_SECRET (in the environment or .env), pass --secret-file, "
                "or start the server once (`layercode-agent serve`) to create the development secret.",
            )
        )
        raise typer.Exit(2)
    return secrets.values[0], secrets.source


def _from_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint="--secret-file") from None
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{path} is not UTF-8 text", param_hint="--secret-file") from None
    return _one_line(text, str(path), "--secret-file")


def _from_stdin() -> str:
    stdin = sys.stdin
    if stdin is None:  # Under pythonw, or started with standard input closed.
        raise typer.BadParameter("there is no standard input to read the secret from", param_hint="--secret")
    if stdin.isatty():
        try:
            typed = getpass.getpass("Webhook secret: ")
        except EOFError:
            typed = ""
        return _one_line(typed, "standard input", "--secret")
    try:
        fd = stdin.fileno()
    except (OSError, ValueError):  # Replaced by an object without a descriptor (tests, embedding).
        line = stdin.readline()
    else:
        line = _read_line(fd)
    return _one_line(line, "standard input", "--secret")


def _read_line(fd: int) -> str:
    """The first line of `fd`, read byte by byte so that nothing after it is consumed."""
    data = bytearray()
    while not data.endswith(b"\n") and (byte := os.read(fd, 1)):
        data += byte
    return data.decode("utf-8", "replace")


def _one_line(text: str, where: str, option: str) -> str:
    value = text.strip()
    if not value:
        raise typer.BadParameter(f"{where} holds no secret", param_hint=option)
    if "\n" in value:
        raise typer.BadParameter(f"{where} holds more than one line: put only the secret in it", param_hint=option)
    return value
