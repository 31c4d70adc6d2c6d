"""Every secret a caller presents is compared with `hmac.compare_digest`, never `==` (no timing oracle)."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

import pytest

from ..fakes.layercode_api import API_KEY, FakeLayercodeAPI
from .conftest import AppFactory

pytestmark = pytest.mark.anyio


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, Any]]]:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    yield calls


def _presented(calls: list[tuple[Any, Any]], value: str) -> bool:
    return any(value in (a.decode() if isinstance(a, bytes) else str(a)) for a, _ in calls)


async def test_webhook_signatures(make_app: AppFactory, compared: list[tuple[Any, Any]]) -> None:
    async with make_app() as app:
        response = await app.http.post(
            "/api/agent", content=b"{}", headers={"layercode-signature": f"t=1,v1={'ab' * 32}"}
        )
        await app.client().say("Hello.")
    assert response.status_code == 401  # Stale: refused before any digest is compared.
    assert compared, "the signature was not compared with hmac.compare_digest"


async def test_admin_token(make_app: AppFactory, compared: list[tuple[Any, Any]]) -> None:
    async with make_app(admin_token="admin_" + "z" * 30) as app:
        response = await app.http.get("/api/conversations", headers={"Authorization": "Bearer guess_admin"})
    assert response.status_code == 401
    assert _presented(compared, "guess_admin")


async def test_authorize_token(make_app: AppFactory, compared: list[tuple[Any, Any]]) -> None:
    with FakeLayercodeAPI() as api:
        settings = {"layercode_api_key": API_KEY, "layercode_api_url": api.url, "layercode_agent_id": "ag_ct"}
        async with make_app(**settings, authorize_token="tok_" + "q" * 30) as app:
            response = await app.http.post("/api/authorize", json={}, headers={"Authorization": "Bearer guess_tok"})
    assert response.status_code == 401
    assert _presented(compared, "guess_tok")
