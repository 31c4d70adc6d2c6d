from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..fakes.layercode_api import API_KEY, FakeLayercodeAPI
from ..fakes.net import free_port
from .conftest import AppFactory

pytestmark = pytest.mark.anyio


@pytest.fixture
def api() -> Iterator[FakeLayercodeAPI]:
    with FakeLayercodeAPI() as fake:
        yield fake


async def test_authorize_forwards_with_the_bearer_key(make_app: AppFactory, api: FakeLayercodeAPI) -> None:
    async with make_app(layercode_api_key=API_KEY, layercode_api_url=api.url) as app:
        response = await app.http.post(
            "/api/authorize",
            json={
                "agent_id": "ag_123",
                "conversation_id": "lc_conv_resume",
                "metadata": {"userId": "u_1"},
                "sdk_version": "2.7.0",
                "config": {"plugins": []},
                "custom_headers": {"x-evil": "1"},
            },
        )
    assert response.status_code == 200
    assert response.json()["client_session_key"] == "lc_sesskey_test123"
    assert response.json()["conversation_id"] == "lc_conv_resume"
    assert response.json()["config"]["transcription"]["trigger"] == "automatic"
    call = api.calls[0]
    assert call.authorization == f"Bearer {API_KEY}"
    assert call.body == {
        "agent_id": "ag_123",
        "conversation_id": "lc_conv_resume",
        "metadata": {"userId": "u_1"},
        "sdk_version": "2.7.0",
    }


async def test_pinned_agent_id_is_used_and_others_refused(make_app: AppFactory, api: FakeLayercodeAPI) -> None:
    async with make_app(layercode_api_key=API_KEY, layercode_api_url=api.url, layercode_agent_id="ag_pinned") as app:
        implicit = await app.http.post("/api/authorize", json={})
        other = await app.http.post("/api/authorize", json={"agent_id": "ag_other"})
    assert implicit.status_code == 200
    assert api.calls[0].body["agent_id"] == "ag_pinned"
    assert other.status_code == 403
    assert "ag_other" in other.json()["error"]
    assert len(api.calls) == 1


@pytest.mark.parametrize(("status", "message"), [(400, "invalid agent ID"), (402, "insufficient balance")])
async def test_layercode_errors_keep_their_status_and_message(
    make_app: AppFactory, api: FakeLayercodeAPI, status: int, message: str
) -> None:
    api.next_status, api.next_error = status, message
    async with make_app(layercode_api_key=API_KEY, layercode_api_url=api.url) as app:
        response = await app.http.post("/api/authorize", json={"agent_id": "ag_1"})
    assert response.status_code == status
    assert response.json() == {"error": message}


async def test_wrong_key_is_reported_from_layercode(make_app: AppFactory, api: FakeLayercodeAPI) -> None:
    async with make_app(layercode_api_key="wrong", layercode_api_url=api.url) as app:
        response = await app.http.post("/api/authorize", json={"agent_id": "ag_1"})
    assert response.status_code == 400
    assert "bearer" in response.json()["error"]


async def test_unreachable_api_is_502(make_app: AppFactory) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with make_app(layercode_api_key=API_KEY, layercode_api_url=url) as app:
        response = await app.http.post("/api/authorize", json={"agent_id": "ag_1"})
    assert response.status_code == 502
    assert "unreachable" in response.json()["error"]


async def test_slow_api_is_504(make_app: AppFactory, api: FakeLayercodeAPI) -> None:
    api.delay = 2.0
    async with make_app(layercode_api_key=API_KEY, layercode_api_url=api.url, authorize_timeout=0.2) as app:
        response = await app.http.post("/api/authorize", json={"agent_id": "ag_1"})
    assert response.status_code == 504


async def test_missing_key_is_a_clear_error(make_app: AppFactory) -> None:
    async with make_app() as app:
        response = await app.http.post("/api/authorize", json={"agent_id": "ag_1"})
    assert response.status_code == 503
    assert "LAYERCODE_API_KEY" in response.json()["error"]


@pytest.mark.parametrize(("body", "fragment"), [(b"{nope", "JSON"), (b"[1]", "object"), (b"{}", "agent_id")])
async def test_bad_authorize_bodies(make_app: AppFactory, api: FakeLayercodeAPI, body: bytes, fragment: str) -> None:
    async with make_app(layercode_api_key=API_KEY, layercode_api_url=api.url) as app:
        response = await app.http.post("/api/authorize", content=body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]
    assert api.calls == []


async def test_health(make_app: AppFactory) -> None:
    async with make_app() as app:
        response = await app.http.get("/health")
    assert response.json() == {"status": "ok"}
