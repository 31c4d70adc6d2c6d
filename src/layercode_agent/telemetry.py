"""Optional tracing through Logfire: on when `LOGFIRE_TOKEN` is set, silent and free otherwise."""

from __future__ import annotations

import logging

__all__ = ["configure_logfire"]

logger = logging.getLogger("layercode_agent")


def configure_logfire(token: str | None) -> bool:
    """Send pydantic-ai spans to Logfire when a token is given; return whether tracing is on."""
    if not token:
        return False
    try:
        import logfire
    except ImportError:
        logger.warning("LOGFIRE_TOKEN is set but logfire is not installed: uv sync --extra logfire")
        return False
    logfire.configure(token=token, service_name="layercode-agent", console=False)
    logfire.instrument_pydantic_ai()
    return True
