"""A disk that stalls on demand under the SQLite store, as a frozen or failing file system would.

`install(flag)` makes every SQLite connection opened afterwards block each statement while the file
`flag` exists and the statement is one it names: the flag holds a conversation id (a statement with a
parameter containing it waits), or `*` (every statement waits, as under `fsfreeze`). A statement that
starts waiting touches `flag` + `.hit`, so a test knows the stall has caught a call. Removing the flag
ends the stall, as thawing the file system would: the waiting statements then run.

Unit tests patch `sqlite3.connect` with `stalling_connect(flag)`; a real server gets it from
`SITE_DIR`, put first on its `PYTHONPATH` (`stall_env`), whose `sitecustomize` installs it at
start-up with the flag named by `STALLED_DISK_FLAG`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["FLAG_ENV", "SITE_DIR", "hit_path", "install", "stall_env", "stalling_connect"]

FLAG_ENV = "STALLED_DISK_FLAG"
SITE_DIR = Path(__file__).resolve().parent / "stalled_disk_site"
_REPO = Path(__file__).resolve().parents[2]


def hit_path(flag: Path) -> Path:
    """The file touched once a statement is stalled by `flag`."""
    return flag.with_name(flag.name + ".hit")


def stall_env(flag: Path) -> dict[str, str]:
    """The environment a server process needs to run on the stalling disk (nothing stalls until `flag` exists)."""
    return {"PYTHONPATH": os.pathsep.join([str(SITE_DIR), str(_REPO)]), FLAG_ENV: str(flag)}


def _values(row: Any) -> list[object]:
    if isinstance(row, Mapping):
        return list(row.values())  # pyright: ignore[reportUnknownArgumentType, reportUnknownMemberType]
    if isinstance(row, list | tuple):
        return list(row)  # pyright: ignore[reportUnknownArgumentType]
    return []


def _wait(flag: Path, rows: Iterable[Any]) -> None:
    """Block while `flag` exists, if it names a value of one of the statement's parameter rows."""
    try:
        needle = flag.read_text().strip()
    except FileNotFoundError:
        return
    if needle != "*" and not any(isinstance(value, str) and needle in value for row in rows for value in _values(row)):
        return
    hit_path(flag).touch()
    while flag.exists():
        time.sleep(0.02)


def stalling_connect(flag: Path) -> Callable[..., sqlite3.Connection]:
    """`sqlite3.connect`, opening connections whose statements stall while `flag` names them."""

    class StallingConnection(sqlite3.Connection):
        def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
            _wait(flag, [parameters])
            return super().execute(sql, parameters)

        def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
            rows = list(parameters)
            _wait(flag, rows)
            return super().executemany(sql, rows)

    connect = sqlite3.connect

    def stalling(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", StallingConnection)
        return connect(*args, **kwargs)

    return stalling


def install(flag: Path) -> None:
    """Make every SQLite connection opened from now on stall its statements while `flag` names them."""
    sqlite3.connect = stalling_connect(flag)
