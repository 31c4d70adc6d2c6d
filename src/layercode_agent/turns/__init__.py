"""The use case: one webhook in, the events to stream back out, and the conversation kept true.

This is the only package that combines the Layercode protocol, the agent and the store. Each module
has one job:

- `timing`: when each `Stage` of a turn happened, the `TurnReport` and the `TurnObserver` hooks;
- `state`: one turn's state (`Turn`, one `Phase`), the queue its task fills and its response reads;
- `adapter`: the agent's events as Layercode's (`response.tts` through the voice cleaner, tool
  filler, tool status as `response.data`), keeping the tool calls that returned;
- `workers`: workers sharing a store: heartbeats, cancel requests, take-over, delivery claims, the
  per-conversation locks;
- `handlers`: the `session.start`, `data`, `session.end` and `session.update` webhooks;
- `runner`: `TurnRunner`, which composes them: begin, answer, close (see its module docstring).

What a turn stores is decided by the pure functions of `history`.
"""

from __future__ import annotations

from .handlers import DataHandler, default_data_handler
from .runner import TurnRunner
from .timing import Stage, TurnObserver, TurnReport, TurnTiming
from .workers import CANCEL_TTL, DELIVERY_TTL, HEARTBEAT_EVERY, HEARTBEAT_TTL, DeliveryInProgressError

__all__ = [
    "CANCEL_TTL",
    "DELIVERY_TTL",
    "HEARTBEAT_EVERY",
    "HEARTBEAT_TTL",
    "DataHandler",
    "DeliveryInProgressError",
    "Stage",
    "TurnObserver",
    "TurnReport",
    "TurnRunner",
    "TurnTiming",
    "default_data_handler",
]
