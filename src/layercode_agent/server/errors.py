"""Map the project's errors to HTTP answers; the only place that knows status codes.

- `SignatureError` -> 401 with the precise reason (nothing stored, no LLM call)
- `PayloadError` -> 400 (not JSON, on any route that reads a body) or 422 (JSON that is not a valid event),
  saying what is wrong
- `StoreError` -> 503 (the conversation store is unreachable; Layercode may retry). The body says only that:
  the error's own message names the store (a Redis host and port, a database path), so it goes to the log
- `AdminAuthError` -> 401 with `WWW-Authenticate: Bearer` (the admin API's token is missing or wrong)
- `ClientDisconnect` (the client went away, or was too slow, before its body was in: uvicorn's protocol has
  answered 408 and closed the connection, see `server/http.py`) -> nothing more to send, one debug line, no
  traceback
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from ..protocol import PayloadError, SignatureError
from ..stores import StoreError
from .access import client_ip

__all__ = ["STORE_UNAVAILABLE", "AdminAuthError", "install_error_handlers"]

logger = logging.getLogger("layercode_agent.server")

STORE_UNAVAILABLE = "conversation store unavailable"
"""The whole body of a 503 for a store failure (`{"error": STORE_UNAVAILABLE}`): no address, path or driver text."""


class AdminAuthError(Exception):
    """A request to the admin API without the right `Authorization: Bearer` token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        """Why it was refused, safe to send back (it never contains a token)."""


async def _signature_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SignatureError)
    logger.warning("rejected webhook from %s: %s", client_ip(request), exc.reason)
    return JSONResponse({"error": "invalid signature", "reason": exc.reason}, status_code=401)


async def _payload_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PayloadError)
    logger.warning("bad body for %s from %s: %s", request.url.path, client_ip(request), exc)
    return JSONResponse({"error": "invalid body", "reason": str(exc)}, status_code=exc.status_code)


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("conversation store failed (%s %s): %s", request.method, request.url.path, exc)
    return JSONResponse({"error": STORE_UNAVAILABLE}, status_code=503)


async def _client_disconnect(request: Request, exc: Exception) -> Response:
    # Too slow: uvicorn's protocol logged it, answered 408 and closed. Gone: nobody to tell. Either way uvicorn
    # drops whatever is sent now; without this handler the exception would reach it as a 90-line traceback.
    logger.debug(
        "%s %s from %s: the client went away before its body was in",
        request.method,
        request.url.path,
        client_ip(request),
    )
    return Response(status_code=400)


async def _admin_auth_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AdminAuthError)
    logger.warning("rejected admin request from %s: %s", client_ip(request), exc.reason)
    return JSONResponse(
        {"error": "unauthorized", "reason": exc.reason}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(SignatureError, _signature_error)
    app.add_exception_handler(AdminAuthError, _admin_auth_error)
    app.add_exception_handler(PayloadError, _payload_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
