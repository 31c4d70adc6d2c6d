"""`/playground`: a browser page for talking to the agent locally, through the webhook path Layercode uses.

Why a proxy: the page must never hold the webhook secret, so it cannot sign webhooks itself.
`POST /playground/api/agent` signs the page's exact body bytes with the server's own secret and posts them
over loopback HTTP to this server's real `POST /api/agent`, then relays the answer chunk by chunk. What
the page tries is what Layercode gets: the signature check, duplicate handling, and barge-in as an
aborted request (when the page aborts its fetch, the upstream request is closed too).

Why the guards: a route that signs whatever it is given would let anyone who reaches it forge webhooks.
So it exists only with `PLAYGROUND` on and `HOST` a loopback address (`create_app` refuses to mount it
otherwise, and `serve`'s banner says why). Every request must also come from a loopback client and carry
a loopback `Host` header; the second check stops DNS rebinding, where a remote page reaches localhost
under a name it controls. The POST must be same-origin (a cross-site `Origin` or `Sec-Fetch-Site` gets
403) and `application/json`, a type that makes browsers send a CORS preflight first. This server never
grants CORS.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Final

import anyio
import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from ...protocol import SIGNATURE_HEADER, sign
from ..access import is_loopback_ip
from ..deps import RuntimeDep, read_body, read_json

__all__ = ["PLAYGROUND_PATH", "is_loopback_host", "playground_refusal", "router"]

logger = logging.getLogger("layercode_agent.server")

router = APIRouter()

PLAYGROUND_PATH: Final = "/playground"
"""Where the page is served."""

PAGE_TYPES: Final = frozenset({"message", "session.start", "data", "session.end"})
"""The webhook types the page may send through the proxy."""

_STATIC_NAME: Final = re.compile(r"[A-Za-z0-9_-]+\.(css|js|svg)")
_STATIC_TYPES: Final = {
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
# Relayed from the real webhook answer; nothing else (no cookies, no server internals).
_RELAYED_HEADERS: Final = ("content-type", "cache-control", "x-accel-buffering")
# A turn may stay silent for a while (a slow tool, a slow first token); the webhook itself ends every
# turn with `response.end` within LLM_TIMEOUT, and the page's Stop button aborts earlier.
_UPSTREAM_TIMEOUT: Final = httpx.Timeout(10.0, read=None)
_PAGE_HEADERS: Final = {
    # Everything comes from this server: no CDN, no inline script, and no framing (clickjacking).
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_loopback_host(host: str) -> bool:
    """Whether a `HOST` to bind is loopback only (`127.0.0.1`, any `127.x`, `::1`, `localhost`)."""
    name = host.strip().lower()
    return name == "localhost" or is_loopback_ip(name)


def playground_refusal(host: str) -> str | None:
    """Why the playground cannot be served on `host`, or `None` when it can."""
    if is_loopback_host(host):
        return None
    return (
        f"HOST={host} is not a loopback address, and the playground signs webhooks with the server's secret; "
        "it is only served on 127.0.0.1, localhost or ::1"
    )


def _client_is_loopback(request: Request) -> bool:
    return request.client is not None and is_loopback_ip(request.client.host)


def _host_header_is_loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, port = host.partition("]")
        name += bracket
        if port and not port.startswith(":"):
            return False
        port = port[1:]
    else:
        name, _, port = host.partition(":")
    return (not port or port.isdigit()) and (name == "localhost" or is_loopback_ip(name))


def _cross_site(request: Request) -> str | None:
    """Why a POST is not same-origin, or `None` when it is (or comes from a non-browser client)."""
    origin = request.headers.get("origin")
    expected = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    if origin is not None and origin.lower() != expected:
        return f"cross-site request from Origin {origin[:100]!r}"
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request (Sec-Fetch-Site: {site[:30]})"
    return None


def _refusal(request: Request, *, post: bool = False) -> Response | None:
    reason: str | None = None
    if not _client_is_loopback(request):
        reason = "the playground only answers clients on this machine"
    elif not _host_header_is_loopback(request.headers.get("host")):
        reason = "the playground only answers requests addressed to localhost or a loopback IP (127.0.0.1, [::1])"
    elif post:
        reason = _cross_site(request)
    if reason is None:
        return None
    client = request.client.host if request.client else "unknown"
    logger.warning("refused playground request %s %s from %s: %s", request.method, request.url.path, client, reason)
    return JSONResponse({"error": "forbidden", "reason": reason}, status_code=403)


def _asset(name: str) -> bytes:
    return (resources.files("layercode_agent.server") / "playground" / name).read_bytes()


@router.get(PLAYGROUND_PATH, response_model=None)
async def get_playground(request: Request) -> Response:
    """The page: plain HTML that loads its own script and stylesheet from this server."""
    if (refused := _refusal(request)) is not None:
        return refused
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


@router.get(PLAYGROUND_PATH + "/static/{name}", response_model=None)
async def get_playground_asset(name: str, request: Request) -> Response:
    """One of the page's files (`app.js`, `style.css`), shipped inside the package."""
    if (refused := _refusal(request)) is not None:
        return refused
    match = _STATIC_NAME.fullmatch(name)
    try:
        content = _asset(name) if match else None
    except (FileNotFoundError, IsADirectoryError):
        content = None
    if match is None or content is None:
        return JSONResponse({"error": "not found"}, status_code=404)
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    return Response(content, media_type=_STATIC_TYPES[match.group(1)], headers=headers)


def _bad_request(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": "invalid body", "reason": reason}, status_code=status)


def _check_body(body: dict[str, Any]) -> JSONResponse | None:
    if body.get("type") not in PAGE_TYPES:
        return _bad_request(422, f"body must be a JSON object whose type is one of {sorted(PAGE_TYPES)}")
    return None


def _webhook_url(request: Request) -> str:
    """This server's own `/api/agent`, at the address the page's request arrived on."""
    server = request.scope.get("server")
    if server and isinstance(server[1], int) and is_loopback_host(str(server[0])):
        host = str(server[0])
        host = f"[{host}]" if ":" in host else host
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return f"{request.url.scheme}://{host}:{server[1]}{root}/api/agent"
    return str(request.base_url).rstrip("/") + "/api/agent"


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    # Each chunk goes on the moment it arrives. When the page aborts its fetch, Starlette cancels this
    # generator; closing the upstream response then aborts the webhook request, which the webhook route
    # sees as Layercode's barge-in. The close is shielded so the cancellation cannot skip it.
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()


@router.post(PLAYGROUND_PATH + "/api/agent", response_model=None)
async def proxy_webhook(request: Request, runtime: RuntimeDep) -> Response:
    """Sign the page's webhook body with this server's secret, post it to `/api/agent`, relay the answer."""
    if (refused := _refusal(request, post=True)) is not None:
        return refused
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        return _bad_request(415, "the playground only accepts Content-Type: application/json")
    # Read and decoded as the webhook will (a 400 for what it would refuse as malformed); forwarded byte for byte.
    if (invalid := _check_body(await read_json(request))) is not None:
        return invalid
    raw = await read_body(request)
    if not runtime.secrets:
        return JSONResponse({"error": "no webhook secret configured"}, status_code=503)
    headers = {
        "content-type": "application/json",
        SIGNATURE_HEADER: sign(raw, runtime.secrets[0]),
        "accept-encoding": "identity",
    }
    url = _webhook_url(request)
    upstream_request = runtime.http.build_request("POST", url, content=raw, headers=headers, timeout=_UPSTREAM_TIMEOUT)
    try:
        upstream = await runtime.http.send(upstream_request, stream=True)
    except httpx.TransportError as exc:
        logger.warning("playground could not reach %s: %s", url, type(exc).__name__)
        return JSONResponse({"error": "webhook unreachable", "reason": type(exc).__name__}, status_code=502)
    relayed = {name: value for name in _RELAYED_HEADERS if (value := upstream.headers.get(name)) is not None}
    relayed["X-Content-Type-Options"] = "nosniff"
    return StreamingResponse(
        _relay(upstream),
        status_code=upstream.status_code,
        headers=relayed,
        # Also runs when the relay never started iterating; closing twice is harmless.
        background=BackgroundTask(upstream.aclose),
    )
