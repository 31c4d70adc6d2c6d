"""What the routes share: settings, secrets, the store, the turn runner and an HTTP client, built once per process."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from pydantic import SecretStr

from ..config import Settings
from ..stores import AgentStore
from ..turns import TurnRunner
from .access import Gate
from .streams import StreamSlots

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
    stream_slots: StreamSlots = field(default_factory=StreamSlots)
    """The reply streams open on this worker and the turns they answer, for `MAX_STREAMS_PER_CONVERSATION`
    (`server/streams.py`)."""
    draining: bool = False
    """True once this worker shuts down (`server/shutdown.py`): new requests get 503 (a readiness check
    too), while the reply streams already open finish or are stopped with `response.end`."""
    requests_in_flight: int = 0
    """Requests being answered now, reply streams included (`/health`, `/ready` and `/metrics` aside): a
    drain waits for them."""
