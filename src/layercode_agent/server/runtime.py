"""What the routes share: settings, secrets, the store, the turn runner and an HTTP client, built once per process."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from pydantic import SecretStr

from ..config import Settings
from ..stores import AgentStore
from ..turns import TurnRunner
from .access import Gate

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """Services for one worker process."""

    settings: Settings = field(repr=False)
    """Left out of the repr: a plain-string setting such as the store URL may carry a password."""
    secrets: list[SecretStr]
    """The webhook secrets; `protocol.sign`/`verify` unwrap them only to compute the HMAC."""
    secret_source: str
    runner: TurnRunner
    store: AgentStore
    """The conversation store the runner writes to; the admin API reads it."""
    http: httpx.AsyncClient
    model_name: str
    store_description: str
    gate: Gate | None = None
    """Who may mint sessions at `/api/authorize`; set at start-up."""
    open_streams: dict[str, int] = field(default_factory=dict[str, int])
    """Reply streams open per conversation on this worker (`MAX_STREAMS_PER_CONVERSATION`)."""
