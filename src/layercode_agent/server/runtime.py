"""What the routes share: settings, secrets, the store, the turn runner and an HTTP client, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from ..config import Settings
from ..stores import AgentStore
from ..turns import TurnRunner

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """Services for one worker process."""

    settings: Settings
    secrets: list[str]
    secret_source: str
    runner: TurnRunner
    store: AgentStore
    """The conversation store the runner writes to; the admin API reads it."""
    http: httpx.AsyncClient
    model_name: str
    store_description: str
