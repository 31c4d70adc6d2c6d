"""Map the project's errors to HTTP answers; the only place that knows status codes.

- `SignatureError` -> 401 with the precise reason (nothing stored, no LLM call)
- `PayloadError` -> 400 (not JSON) or 422 (JSON that is not a valid event), saying what is wrong
- `StoreError` -> 503 (the conversation store is unreachable; Layercode may retry)
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..protocol import PayloadError, SignatureError
from ..stores import StoreError

__all__ = ["install_error_handlers"]

logger = logging.getLogger("layercode_agent.server")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _signature_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SignatureError)
    logger.warning("rejected webhook from %s: %s", _client(request), exc.reason)
    return JSONResponse({"error": "invalid signature", "reason": exc.reason}, status_code=401)


async def _payload_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PayloadError)
    logger.warning("bad webhook body from %s: %s", _client(request), exc)
    return JSONResponse({"error": "invalid body", "reason": str(exc)}, status_code=exc.status_code)


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("conversation store failed: %s", exc)
    return JSONResponse({"error": "conversation store unavailable", "reason": str(exc)}, status_code=503)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(SignatureError, _signature_error)
    app.add_exception_handler(PayloadError, _payload_error)
    app.add_exception_handler(StoreError, _store_error)
