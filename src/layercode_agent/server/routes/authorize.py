"""`POST /api/authorize`: mint a Layercode client session for the browser without exposing the API key.

Forwards to `POST {LAYERCODE_API_URL}/v1/agents/web/authorize_session` (docs.layercode.com/api-reference/
rest-api, Oct 2025) with the bearer key, for this server's own agent (`LAYERCODE_AGENT_ID`) only: a
request naming another agent is refused. Who may ask, and how often, is the gate's business (see
`server.access`): the user's `AUTHORIZE_HOOK`, an `AUTHORIZE_TOKEN`, or loopback clients only, then
`AUTHORIZE_RATE_LIMIT` per caller. `conversation_id` (to resume) and the browser's metadata pass
through, with the hook's metadata written over the browser's; per-session `config` and
`custom_headers` never do, since they would let any visitor rewrite the agent's webhooks.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...protocol import PayloadError
from ..access import AuthorizeRefused, RateLimited
from ..deps import RuntimeDep, read_json

__all__ = ["AUTHORIZE_PATH", "router"]

logger = logging.getLogger("layercode_agent.server")

router = APIRouter()

AUTHORIZE_PATH = "/v1/agents/web/authorize_session"
_FORWARDED = ("conversation_id", "sdk_version")
_METADATA = ("metadata", "custom_metadata")

_REQUEST_SCHEMA: dict[str, Any] = {
    # `null` is the same as absent; unknown keys (`config`, `custom_headers`, ...) are dropped.
    "type": "object",
    "properties": {
        "agent_id": {"type": ["string", "null"], "description": "Must be this server's LAYERCODE_AGENT_ID, if given."},
        "conversation_id": {"type": ["string", "null"], "description": "Resume this conversation."},
        "metadata": {"type": ["object", "null"], "description": "Passed to the webhooks; the hook's metadata wins."},
        "custom_metadata": {"type": ["object", "null"]},
        "sdk_version": {"type": ["string", "null"]},
    },
}
_ERROR = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
                "required": ["error"],
            }
        }
    }
}
_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": False, "content": {"application/json": {"schema": _REQUEST_SCHEMA}}},
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A client session from Layercode",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["client_session_key"],
                    "properties": {"client_session_key": {"type": "string"}, "conversation_id": {"type": "string"}},
                }
            }
        },
    },
    400: {
        "description": "The body is not a JSON object (read as the webhook's is: UTF-8, at most 64 levels deep, no"
        " lone surrogates), or a field has the wrong type; `reason` says which",
        **_ERROR,
    },
    401: {"description": "Missing or wrong AUTHORIZE_TOKEN", **_ERROR},
    403: {"description": "Refused: another agent, the hook said no, or not a loopback client", **_ERROR},
    413: {"description": "Body over MAX_BODY_BYTES"},
    429: {"description": "Over AUTHORIZE_RATE_LIMIT; see Retry-After", **_ERROR},
    502: {"description": "Layercode's API is unreachable or answered nonsense", **_ERROR},
    503: {
        "description": "Not configured (LAYERCODE_API_KEY, LAYERCODE_AGENT_ID), the check failed, or the"
        " conversation store (which keeps the rate limit) is unavailable",
        **_ERROR,
    },
    504: {"description": "Layercode's API did not answer in time", **_ERROR},
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@router.post("/api/authorize", response_model=None, openapi_extra=_OPENAPI, responses=_RESPONSES)
async def authorize_session(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Ask Layercode for a `client_session_key` on an admitted caller's behalf."""
    settings = runtime.settings
    if settings.layercode_api_key is None:
        return _error(503, "LAYERCODE_API_KEY is not set on this server, so it cannot authorize sessions")
    agent_id = settings.layercode_agent_id
    if not agent_id:
        return _error(503, "LAYERCODE_AGENT_ID is not set on this server, so it cannot authorize sessions")
    if runtime.gate is None:
        return _error(503, "the server is starting")
    # Read and decoded as on every route, before the gate, so a hook that looks at the body finds it checked.
    body = await read_json(request, optional=True)
    try:
        caller = await runtime.gate.admit(request)
    except AuthorizeRefused as refused:
        return _error(refused.status, refused.reason, refused.headers)
    except RateLimited as limited:
        return _error(429, str(limited), {"Retry-After": limited.header})

    requested = body.get("agent_id")
    if requested is not None and requested != agent_id:
        return _error(403, f"agent_id {str(requested)[:80]!r} is not served by this backend")
    payload: dict[str, Any] = {"agent_id": agent_id}
    for key in _FORWARDED:
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise PayloadError(f"{key} must be a string")
        if value:
            payload[key] = value
    for key in _METADATA:
        value = body.get(key)
        if value is not None and not isinstance(value, dict):
            raise PayloadError(f"{key} must be a JSON object")
        # What the gate vouches for (the hook's user id, tenant) is written over whatever the browser claimed.
        merged = {**(value or {}), **caller.metadata}
        if merged and (value is not None or key == "metadata"):
            payload[key] = merged

    url = settings.layercode_api_url.rstrip("/") + AUTHORIZE_PATH
    try:
        response = await runtime.http.post(
            url,
            json=payload,
            headers={"Authorization": f"Bearer {settings.layercode_api_key.get_secret_value()}"},
            timeout=settings.authorize_timeout,
        )
    except httpx.TimeoutException:
        logger.warning("Layercode API timed out after %ss (%s)", settings.authorize_timeout, url)
        return _error(504, f"Layercode API did not answer within {settings.authorize_timeout:g} s")
    except httpx.TransportError as exc:
        logger.warning("Layercode API unreachable at %s: %s", url, type(exc).__name__)
        return _error(502, f"Layercode API unreachable: {type(exc).__name__}")
    try:
        answer: Any = response.json()
    except ValueError:
        answer = None
    if response.status_code != 200:
        message = answer.get("error") if isinstance(answer, dict) else None
        message = message if isinstance(message, str) else (response.text[:500] or response.reason_phrase)
        logger.warning("Layercode refused to authorize agent %s: %s %s", agent_id, response.status_code, message)
        # Layercode's own failures are a bad gateway here, not an error of this server.
        return _error(502 if response.status_code >= 500 else response.status_code, message)
    if not isinstance(answer, dict) or not isinstance(answer.get("client_session_key"), str):
        return _error(502, "Layercode API returned an unexpected answer (no client_session_key)")
    logger.info("authorized a session of agent %s for %s", agent_id, caller.identity)
    return JSONResponse(answer)
