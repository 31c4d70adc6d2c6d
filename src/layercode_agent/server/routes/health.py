"""Liveness (`GET /health`) and readiness (`GET /ready`), for load balancers, orchestrators and `tunnel`.

- **Liveness**: the process serves HTTP. Always 200 while it does; restart the process when it stops.
  It never looks at the store, so a store outage does not get every worker restarted.
- **Readiness**: this worker can answer a caller now. It writes one small marker to the conversation
  store (`AgentStore.ping`) within `READY_TIMEOUT`; a store down, hung, read-only or on a stalled disk
  gives 503 with `Retry-After`, and so does a worker that is shutting down (`Runtime.draining`, set by
  the drain in `server/shutdown.py`, which leaves this route to answer it). Route callers only to
  ready workers. The 503 says what kind of trouble it is, never where: the store's address, path
  or error go to the log, once per change from ready to not ready.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Final, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ...stores import StoreError
from ..deps import RuntimeDep
from ..shutdown import RETRY_AFTER as DRAINING_RETRY_AFTER

__all__ = ["READY_TIMEOUT", "router"]

logger = logging.getLogger("layercode_agent.server")

READY_TIMEOUT: Final = 1.0
"""Seconds the readiness check waits for the store: well below a load balancer's usual probe timeout."""
RETRY_AFTER: Final = "5"
"""Seconds a prober should wait before asking again after the store failed."""

router = APIRouter()


class Ready(BaseModel):
    """This worker can answer callers."""

    status: Literal["ready"] = "ready"


class NotReady(BaseModel):
    """Why this worker should get no callers now, without any address or path."""

    status: Literal["unavailable", "draining"]
    reason: str


_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": NotReady,
        "description": "The conversation store failed or did not answer in time, or the worker is shutting down",
        "headers": {
            "Retry-After": {"description": "Seconds to wait before asking again", "schema": {"type": "string"}}
        },
    }
}


@dataclass
class _Readiness:
    """What the last check found, so the log says once when readiness is lost and once when it is back."""

    ready: bool = True


@router.get("/health", summary="Liveness")
async def get_health() -> dict[str, str]:
    """Always `{"status": "ok"}` while the process serves requests."""
    return {"status": "ok"}


@router.get("/ready", summary="Readiness", response_model=Ready, responses=_NOT_READY)
async def get_ready(request: Request, runtime: RuntimeDep) -> Ready | JSONResponse:
    """`{"status": "ready"}` if the conversation store takes a write within `READY_TIMEOUT`; else 503."""
    if runtime.draining:
        return _not_ready("draining", "this worker is shutting down", DRAINING_RETRY_AFTER)
    state = getattr(request.app.state, "readiness", None)
    if not isinstance(state, _Readiness):
        state = request.app.state.readiness = _Readiness()
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await runtime.store.ping()
    except (StoreError, TimeoutError) as exc:
        if state.ready:
            detail = str(exc) if isinstance(exc, StoreError) else f"no answer within {READY_TIMEOUT:g} s"
            logger.warning("not ready: the conversation store failed its check: %s", detail)
        state.ready = False
        return _not_ready("unavailable", "the conversation store is not answering", RETRY_AFTER)
    if not state.ready:
        logger.info("ready again: the conversation store answers")
        state.ready = True
    return Ready()


def _not_ready(status: Literal["unavailable", "draining"], reason: str, retry_after: str) -> JSONResponse:
    body = NotReady(status=status, reason=reason).model_dump()
    return JSONResponse(body, status_code=503, headers={"Retry-After": retry_after})
