"""What `serve` tells the operator about `/api/authorize`, and what it hands to uvicorn for the HTTP limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from rich.console import Console

from layercode_agent.cli import serve as serve_cli
from layercode_agent.config import Settings
from layercode_agent.server.http import PROTOCOL, GuardedHttpToolsProtocol

SECRET = "whsec_banner"


def _banner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: Any) -> tuple[str, dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(serve_cli.uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setenv("HOST", "127.0.0.1")
    console = Console(record=True, width=240)
    settings = Settings(layercode_webhook_secret=SecretStr(SECRET), data_dir=tmp_path, agent_model="test", **values)
    serve_cli.run_server(settings, host="127.0.0.1", port=8124, workers=1, reload=False, console=console)
    return console.export_text(), calls[0]


CONFIGURED = {"layercode_api_key": SecretStr("lc_key_banner"), "layercode_agent_id": "ag_banner"}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, "off until LAYERCODE_API_KEY and LAYERCODE_AGENT_ID are set"),
        (CONFIGURED, "loopback clients only: set AUTHORIZE_TOKEN or AUTHORIZE_HOOK for others; 10/minute each"),
        (
            {**CONFIGURED, "authorize_token": SecretStr("tok_banner_secret"), "authorize_rate_limit": "off"},
            "callers with the AUTHORIZE_TOKEN; no rate limit",
        ),
        (
            {**CONFIGURED, "authorize_hook": "tests.authorize_hooks:by_cookie", "authorize_rate_limit": "5/hour"},
            "callers AUTHORIZE_HOOK=tests.authorize_hooks:by_cookie admits; 5/hour each",
        ),
    ],
)
def test_the_banner_says_who_may_authorize(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, values: dict[str, Any], expected: str
) -> None:
    out, _ = _banner(monkeypatch, tmp_path, **values)
    assert expected in " ".join(out.split())
    for secret in (SECRET, "lc_key_banner", "tok_banner_secret"):
        assert secret not in out


def test_serve_runs_uvicorn_with_the_guarded_protocol(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, kwargs = _banner(monkeypatch, tmp_path)
    assert kwargs["http"] == PROTOCOL
    module, _, name = PROTOCOL.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is GuardedHttpToolsProtocol
