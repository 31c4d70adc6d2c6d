"""A local stand-in for Layercode's REST API (only `authorize_session`), over loopback."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .net import free_port

API_KEY = "lc_test_key"
SESSION_KEY = "lc_sesskey_test123"


@dataclass
class AuthorizeCall:
    """What the fake received."""

    body: dict[str, Any]
    authorization: str | None


@dataclass
class FakeLayercodeAPI:
    """`with FakeLayercodeAPI() as api:`; point `LAYERCODE_API_URL` at `api.url`."""

    calls: list[AuthorizeCall] = field(default_factory=list[AuthorizeCall])
    next_status: int | None = None
    next_error: str = ""
    delay: float = 0.0
    api_key: str = API_KEY
    """The only bearer key it accepts."""
    session_key: str = SESSION_KEY
    """The `client_session_key` it hands out."""

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/v1/agents/web/authorize_session", self._authorize, methods=["POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeLayercodeAPI:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake Layercode API did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def _authorize(self, request: Request) -> Response:
        import asyncio

        body = await request.json()
        authorization = request.headers.get("authorization")
        self.calls.append(AuthorizeCall(body=body, authorization=authorization))
        if self.delay:
            await asyncio.sleep(self.delay)
        if authorization != f"Bearer {self.api_key}":
            return JSONResponse({"error": "invalid or missing bearer token"}, status_code=400)
        if self.next_status is not None:
            status, self.next_status = self.next_status, None
            return JSONResponse({"error": self.next_error}, status_code=status)
        if not str(body.get("agent_id", "")).startswith("ag_"):
            return JSONResponse({"error": "invalid agent ID"}, status_code=400)
        return JSONResponse(
            {
                "client_session_key": self.session_key,
                "conversation_id": body.get("conversation_id") or "lc_conv_new123",
                "config": {"transcription": {"trigger": "automatic", "automatic": True, "can_interrupt": True}},
            }
        )
