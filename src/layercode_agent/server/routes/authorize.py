"""`POST /api/authorize`: mint a Layercode client session for the browser without exposing the API key.

Forwards to `POST {LAYERCODE_API_URL}/v1/agents/web/authorize_session` (docs.layercode.com/api-reference/
rest-api, Oct 2025) with the bearer key. When `LAYERCODE_AGENT_ID` is set, that agent is the only one
this server authorizes: a browser asking for another one is refused. `conversation_id` (to resume) and
the browser's metadata pass through; per-session `config` and `custom_headers` do not, since they would
let any visitor rewrite the agent's webhooks.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..deps import RuntimeDep

__all__ = ["AUTHORIZE_PATH", "router"]

logger = logging.getLogger("layercode_agent.server")

router = APIRouter()

AUTHORIZE_PATH = "/v1/agents/web/authorize_session"
_FORWARDED = ("conversation_id", "metadata", "custom_metadata", "sdk_version")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@router.post("/api/authorize", response_model=None)
async def authorize_session(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Ask Layercode for a `client_session_key` on the browser's behalf."""
    settings = runtime.settings
    if settings.layercode_api_key is None:
        return _error(503, "LAYERCODE_API_KEY is not set on this server, so it cannot authorize sessions")
    raw = await request.body()
    try:
        body: Any = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        return _error(400, f"body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    requested = body.get("agent_id")
    pinned = settings.layercode_agent_id
    if pinned and requested and requested != pinned:
        return _error(403, f"agent_id {requested!r} is not served by this backend")
    agent_id = pinned or requested
    if not agent_id or not isinstance(agent_id, str):
        return _error(400, "agent_id is required (or set LAYERCODE_AGENT_ID on the server)")
    payload: dict[str, Any] = {"agent_id": agent_id}
    payload.update({key: body[key] for key in _FORWARDED if body.get(key) is not None})

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
        return _error(response.status_code, message)
    if not isinstance(answer, dict) or "client_session_key" not in answer:
        return _error(502, "Layercode API returned an unexpected answer (no client_session_key)")
    return JSONResponse(answer)
