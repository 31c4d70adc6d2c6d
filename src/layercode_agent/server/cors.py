"""CORS for `/api/authorize` only, from an explicit allow-list (`CORS_ALLOW_ORIGINS`).

The browser SDK calls `/api/authorize` from the page that hosts the voice widget; if that page is on
another origin, the browser needs CORS headers naming it. Nothing else on this server is meant for
browsers: the webhook is called by Layercode's servers, the admin API by scripts, so they get no CORS
headers at all, and a page on an allowed origin still cannot read them. Starlette's `CORSMiddleware`
does the work (preflights, `Vary: Origin`, refusing unlisted origins); this only narrows where it
applies. Requests to other paths go straight through, without a wrapper around their (streamed) sends.

Credentials (cookies) are allowed only when `CORS_ALLOW_CREDENTIALS` is on, and never with `*`
(the settings refuse that combination at start-up).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["CORS_PATHS", "AuthorizeCORS"]

CORS_PATHS = frozenset({"/api/authorize"})


class AuthorizeCORS:
    """ASGI middleware: `CORSMiddleware` with `origins` on `CORS_PATHS`, nothing elsewhere."""

    def __init__(self, app: ASGIApp, *, origins: Sequence[str], credentials: bool = False) -> None:
        if credentials and "*" in origins:
            raise ValueError("CORS with credentials needs an explicit list of origins, not '*'")
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["POST"],
            allow_headers=["authorization", "content-type"],
            allow_credentials=credentials,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route `/api/authorize` through the CORS middleware and everything else straight to the app."""
        if scope["type"] == "http" and scope["path"] in CORS_PATHS:
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
