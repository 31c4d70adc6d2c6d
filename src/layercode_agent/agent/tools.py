"""Example tools for the built-in agent.

While a tool runs, the caller hears a short filler and the client gets a `response.data` with the
tool's status (see `turns/adapter.py`). Replace these with your own through `AGENT=module:attribute`.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic_ai import ModelRetry, RunContext

from .deps import CallContext

__all__ = ["current_time"]


async def current_time(ctx: RunContext[CallContext], timezone: str = "UTC") -> str:
    """Tell the current date and time in a time zone.

    Args:
        ctx: The run context.
        timezone: An IANA time zone name such as "Europe/London" or "America/New_York".
    """
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ModelRetry(f"Unknown time zone {timezone!r}; use an IANA name such as 'Europe/Paris'.") from exc
    now = datetime.now(zone)
    return now.strftime(f"%A %d %B %Y, %I:%M %p in {timezone}")
