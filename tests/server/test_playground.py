"""The playground routes: mounted only when asked for on a loopback HOST, answering only local same-origin callers,
and relaying a real signed turn through `/api/agent`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from rich.console import Console

from layercode_agent.cli import serve as serve_cli
from layercode_agent.config import Settings
from layercode_agent.protocol import SIGNATURE_HEADER, SSEParser, verify
from layercode_agent.server.routes.playground import is_loopback_host, playground_refusal

from .conftest import SECRET, App, AppFactory

pytestmark = pytest.mark.anyio

LOCAL = "http://localhost:8000"
PAGE_PATHS = ("/playground", "/playground/static/app.js", "/playground/static/style.css")


@asynccontextmanager
async def browser_like(
    app: App, *, client: str = "127.0.0.1", base_url: str = LOCAL
) -> AsyncGenerator[httpx.AsyncClient]:
    """A client reaching the app from `client` with `base_url` as its Host, as a browser on that machine would."""
    transport = httpx.ASGITransport(app=app.app, client=(client, 50123))
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
        yield http


class Recorder(httpx.AsyncBaseTransport):
    """The proxy's loopback hop, served by the app in-process; keeps every request it carried."""

    def __init__(self, app: App) -> None:
        self.inner = httpx.ASGITransport(app=app.app)
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(await request.aread())
        return await self.inner.handle_async_request(request)


@asynccontextmanager
async def playground_app(make_app: AppFactory, **overrides: Any) -> AsyncGenerator[tuple[App, Recorder]]:
    async with make_app(playground=True, **overrides) as app:
        recorder = Recorder(app)
        old = app.runtime.http
        app.runtime.http = httpx.AsyncClient(transport=recorder)
        try:
            yield app, recorder
        finally:
            await app.runtime.http.aclose()
            app.runtime.http = old


def body(event_type: str = "message", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"type": event_type, "session_id": "sess_pg", "conversation_id": "conv_pg"}
    if event_type in ("message", "session.start", "data"):
        base["turn_id"] = f"turn_{event_type}"
    if event_type == "message":
        base["text"] = "Hi"
    return {**base, **fields}


def events_of(raw: bytes) -> list[dict[str, Any]]:
    return list(SSEParser().feed(raw))


# --- Mounted only when asked for, and only on loopback ------------------------------------------------


async def test_routes_do_not_exist_when_the_setting_is_off(make_app: AppFactory) -> None:
    async with make_app() as app, browser_like(app) as http:
        for path in PAGE_PATHS:
            assert (await http.get(path)).status_code == 404, path
        response = await http.post("/playground/api/agent", json=body())
        assert response.status_code == 404


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com"])
async def test_not_mounted_when_host_is_not_loopback(
    make_app: AppFactory, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="layercode_agent")
    async with make_app(playground=True, host=host) as app, browser_like(app) as http:
        for path in PAGE_PATHS:
            assert (await http.get(path)).status_code == 404, path
        assert (await http.post("/playground/api/agent", json=body())).status_code == 404
    assert f"PLAYGROUND is on but not mounted: HOST={host} is not a loopback address" in caplog.text


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
    assert (playground_refusal(host) is None) is loopback


def test_an_empty_setting_is_off_and_true_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAYGROUND", "")
    assert Settings().playground is False
    monkeypatch.setenv("PLAYGROUND", "true")
    assert Settings().playground is True
    monkeypatch.delenv("PLAYGROUND")
    assert Settings().playground is False


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "playground        http://localhost:8123/playground"),
        ("::1", "playground        http://[::1]:8123/playground"),
        ("0.0.0.0", "playground        off: HOST=0.0.0.0 is not a loopback address"),
    ],
)
def test_banner_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, host: str, expected: str) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(serve_cli.uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setenv("HOST", "127.0.0.1")  # run_server exports the bound host; monkeypatch restores it
    console = Console(record=True, width=200)
    settings = Settings(
        layercode_webhook_secret=SecretStr(SECRET), data_dir=tmp_path, agent_model="test", playground=True, host=host
    )
    serve_cli.run_server(settings, host=host, port=8123, workers=1, reload=False, console=console)
    out = console.export_text()
    assert expected in out
    assert SECRET not in out
    assert calls and calls[0]["host"] == host
    # The app factory re-reads HOST: it must see the interface actually bound, so it refuses the same way.
    assert Settings().host == host


def test_no_banner_row_when_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(serve_cli.uvicorn, "run", lambda *args, **kwargs: None)
    monkeypatch.setenv("HOST", "127.0.0.1")
    console = Console(record=True, width=200)
    settings = Settings(layercode_webhook_secret=SecretStr(SECRET), data_dir=tmp_path, agent_model="test")
    serve_cli.run_server(settings, host="127.0.0.1", port=8123, workers=1, reload=False, console=console)
    assert "playground" not in console.export_text()


# --- Only local, same-origin, JSON callers ---------------------------------------------------------------


@pytest.mark.parametrize("client", ["203.0.113.7", "10.1.2.3", "::ffff:192.0.2.1", "2001:db8::1", "testclient"])
async def test_remote_clients_get_403(make_app: AppFactory, client: str) -> None:
    async with playground_app(make_app) as (app, recorder), browser_like(app, client=client) as http:
        for path in PAGE_PATHS:
            response = await http.get(path)
            assert response.status_code == 403, path
            assert response.json()["error"] == "forbidden"
        response = await http.post("/playground/api/agent", json=body())
        assert response.status_code == 403
    assert recorder.requests == [], "a refused request must never be signed or forwarded"


@pytest.mark.parametrize(
    "base_url",
    [
        "http://evil.example:8000",
        "http://localhost.evil.example:8000",
        "http://127.0.0.1.nip.io:8000",
        "http://192.168.1.20:8000",
        "http://test",
    ],
)
async def test_a_non_loopback_host_header_gets_403(make_app: AppFactory, base_url: str) -> None:
    # DNS rebinding: a remote page under a name it controls, resolved to 127.0.0.1, from a local browser.
    async with playground_app(make_app) as (app, recorder), browser_like(app, base_url=base_url) as http:
        for path in PAGE_PATHS:
            assert (await http.get(path)).status_code == 403, path
        assert (await http.post("/playground/api/agent", json=body())).status_code == 403
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("client", "base_url"),
    [("127.0.0.1", "http://127.0.0.1:8000"), ("::1", "http://[::1]:8000"), ("::ffff:127.0.0.1", LOCAL)],
)
async def test_loopback_clients_and_hosts_are_served(make_app: AppFactory, client: str, base_url: str) -> None:
    async with playground_app(make_app) as (app, _), browser_like(app, client=client, base_url=base_url) as http:
        assert (await http.get("/playground")).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "http://localhost:9999"},  # another local app is another origin
        {"origin": "null"},
        {"origin": "https://localhost:8000"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ],
)
async def test_cross_site_posts_get_403(make_app: AppFactory, headers: dict[str, str]) -> None:
    async with playground_app(make_app) as (app, recorder), browser_like(app) as http:
        response = await http.post("/playground/api/agent", json=body(), headers=headers)
    assert response.status_code == 403
    assert "cross-site" in response.json()["reason"]
    assert recorder.requests == []


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
async def test_only_json_is_accepted(make_app: AppFactory, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    async with playground_app(make_app) as (app, recorder), browser_like(app) as http:
        response = await http.post("/playground/api/agent", content=json.dumps(body()).encode(), headers=headers)
    assert response.status_code == 415
    assert recorder.requests == []


async def test_bodies_the_page_would_never_send_are_refused(make_app: AppFactory) -> None:
    json_headers = {"content-type": "application/json"}
    async with playground_app(make_app) as (app, recorder), browser_like(app) as http:
        not_json = await http.post("/playground/api/agent", content=b"{nope", headers=json_headers)
        not_object = await http.post("/playground/api/agent", json=["message"])
        other_type = await http.post("/playground/api/agent", json=body("session.update"))
        # Read by the same parser as the webhook's: too deep for the decoder (once a 500), or deeper than it allows.
        message = json.dumps(body()).encode()[:-1]
        too_deep = [
            await http.post(
                "/playground/api/agent",
                content=message + b',"metadata":{"a":' + b"[" * depth + b"]" * depth + b"}}",
                headers=json_headers,
            )
            for depth in (5000, 900, 100)
        ]
        not_unicode = await http.post(
            "/playground/api/agent", content=json.dumps(body(turn_id="t\ud800")).encode(), headers=json_headers
        )
    assert not_json.status_code == 400 and not_object.status_code == 400
    assert other_type.status_code == 422
    for response in too_deep:
        assert response.status_code == 400
        assert response.json()["error"] == "invalid body" and "nested too deeply" in response.json()["reason"]
    assert not_unicode.status_code == 400 and not_unicode.json()["reason"].startswith("turn_id: ")
    assert recorder.requests == []


# --- The page and its files ---------------------------------------------------------------------------


async def test_page_and_assets_have_sensible_types_and_headers(make_app: AppFactory) -> None:
    async with playground_app(make_app) as (app, _), browser_like(app) as http:
        page = await http.get("/playground")
        script = await http.get("/playground/static/app.js")
        style = await http.get("/playground/static/style.css")
        missing = await http.get("/playground/static/nothing.js")
        python = await http.get("/playground/static/playground.py")
        html = await http.get("/playground/static/index.html")
        traversal = await http.get("/playground/static/..%2Froutes%2Fplayground.py")
        slash = await http.get("/playground/", follow_redirects=True)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert 'src="playground/static/app.js"' in page.text and 'href="playground/static/style.css"' in page.text
    assert "http://" not in page.text and "https://" not in page.text, "no CDN, no external fonts"
    assert script.status_code == 200 and script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "playground/api/agent" in script.text
    assert style.status_code == 200 and style.headers["content-type"] == "text/css; charset=utf-8"
    assert "prefers-color-scheme: dark" in style.text
    for response in (script, style):
        assert response.headers["x-content-type-options"] == "nosniff"
    assert missing.status_code == 404 and python.status_code == 404 and html.status_code == 404
    assert traversal.status_code == 404
    assert slash.status_code == 200 and slash.url.path == "/playground"


def test_assets_ship_inside_the_package() -> None:
    from importlib import resources

    folder = resources.files("layercode_agent.server") / "playground"
    assert {"index.html", "app.js", "style.css"} <= {entry.name for entry in folder.iterdir()}


# --- A real turn through the proxy ------------------------------------------------------------------------


async def test_a_message_goes_through_the_signed_webhook_and_streams_back(make_app: AppFactory) -> None:
    raw = json.dumps(body(text="Hello from the page")).encode()
    async with playground_app(make_app) as (app, recorder), browser_like(app) as http:
        async with http.stream(
            "POST",
            "/playground/api/agent",
            content=raw,
            headers={"content-type": "application/json", "origin": LOCAL, "sec-fetch-site": "same-origin"},
        ) as response:
            chunks = [chunk async for chunk in response.aiter_raw()]
        stored = await app.runtime.store.load("conv_pg")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    events = events_of(b"".join(chunks))
    assert [event["type"] for event in events] == ["response.tts"] * 3 + ["response.end"]
    assert "".join(event.get("content", "") for event in events) == "Hello there, friend."
    # The loopback hop carried the page's exact bytes, signed with the server's own secret.
    [forwarded] = recorder.requests
    assert forwarded.url.path == "/api/agent" and forwarded.url.host == "localhost"
    assert recorder.bodies == [raw]
    assert verify(raw, forwarded.headers[SIGNATURE_HEADER], [SECRET]) > 0
    assert stored is not None and len(stored.messages) == 2


async def test_json_answers_and_errors_pass_through(make_app: AppFactory) -> None:
    async with playground_app(make_app) as (app, _), browser_like(app) as http:
        data = await http.post("/playground/api/agent", json=body("data", data={"action": "ping"}))
        end = await http.post(
            "/playground/api/agent",
            json=body("session.end", transcript=[{"role": "user", "text": "Hi", "timestamp": 1724848800000}]),
        )
        invalid = await http.post("/playground/api/agent", json={"type": "message", "text": "no conversation id"})
        events = await app.runtime.store.session_events("conv_pg")
    assert data.status_code == 200 and data.headers["content-type"] == "application/json"
    assert data.json() == {"type": "response.data", "content": {"status": "ok"}, "turn_id": "turn_data"}
    assert end.status_code == 200 and end.json() == {"status": "ok"}
    assert [event.event_type for event in events] == ["session.end"]
    assert invalid.status_code == 422, "the webhook's own answer, status and all"
    assert "conversation_id" in invalid.text


async def test_the_secret_never_reaches_the_page_or_the_logs(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with playground_app(make_app) as (app, _):
        async with browser_like(app) as http:
            answers = [await http.get(path) for path in PAGE_PATHS]
            answers.append(await http.post("/playground/api/agent", json=body()))
            answers.append(await http.post("/playground/api/agent", json=body("data", data={})))
            answers.append(await http.post("/playground/api/agent", json={"type": "message"}))
            answers.append(await http.post("/playground/api/agent", json=body(), headers={"origin": "http://x"}))
        async with browser_like(app, client="203.0.113.9") as http:
            answers.append(await http.get("/playground"))
    for answer in answers:
        assert SECRET not in answer.text
        assert all(SECRET not in value for value in answer.headers.values())
    assert SECRET not in caplog.text
