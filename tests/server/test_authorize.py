"""`POST /api/authorize` in-process: the pinned agent, the three gates, metadata, the rate limit, Layercode's answers.

The rules that live at the HTTP layer of the real server (CORS headers, the rate limit shared by two
workers over Redis) are tested against `layercode-agent serve` in tests/e2e/test_abuse.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from pydantic_ai.models.function import FunctionModel

from layercode_agent.agent import build_agent
from layercode_agent.config import Settings
from layercode_agent.server import create_app

from ..fakes.layercode_api import API_KEY, FakeLayercodeAPI
from ..fakes.net import free_port
from .conftest import AppFactory, words

pytestmark = pytest.mark.anyio

AGENT = "ag_123"


def _configured(api: FakeLayercodeAPI, **overrides: Any) -> dict[str, Any]:
    return {
        "layercode_api_key": API_KEY,
        "layercode_api_url": api.url,
        "layercode_agent_id": AGENT,
        **overrides,
    }


async def _post(
    settings: dict[str, Any],
    settings_values: dict[str, Any],
    requests: list[dict[str, Any]],
    *,
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> list[httpx.Response]:
    """Send `requests` (httpx.post keyword arguments) to an app seeing them from `client`."""
    # An agent with a model of its own: `auto` would load the embedded model at every start.
    agent = build_agent(model=FunctionModel(stream_function=words))
    app = create_app(Settings(**{**settings_values, **settings}), agent=agent)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return [await http.post("/api/authorize", **request) for request in requests]


async def test_forwards_for_the_pinned_agent_with_the_bearer_key(make_app: AppFactory, api: FakeLayercodeAPI) -> None:
    async with make_app(**_configured(api)) as app:
        response = await app.http.post(
            "/api/authorize",
            json={
                "agent_id": AGENT,
                "conversation_id": "lc_conv_resume",
                "metadata": {"userId": "u_1"},
                "sdk_version": "2.7.0",
                "config": {"plugins": []},
                "custom_headers": {"x-evil": "1"},
            },
        )
        implicit = await app.http.post("/api/authorize", json={})
    assert response.status_code == 200
    assert response.json()["client_session_key"] == "lc_sesskey_test123"
    assert response.json()["conversation_id"] == "lc_conv_resume"
    assert response.json()["config"]["transcription"]["trigger"] == "automatic"
    assert implicit.status_code == 200
    call = api.calls[0]
    assert call.authorization == f"Bearer {API_KEY}"
    # The per-session config and custom headers would let any visitor rewrite the agent's webhooks.
    assert call.body == {
        "agent_id": AGENT,
        "conversation_id": "lc_conv_resume",
        "metadata": {"userId": "u_1"},
        "sdk_version": "2.7.0",
    }
    assert api.calls[1].body == {"agent_id": AGENT}


async def test_another_agent_is_refused_without_calling_layercode(make_app: AppFactory, api: FakeLayercodeAPI) -> None:
    async with make_app(**_configured(api)) as app:
        other = await app.http.post("/api/authorize", json={"agent_id": "ag_someone_elses"})
    assert other.status_code == 403
    assert "ag_someone_elses" in other.json()["error"]
    assert api.calls == []


@pytest.mark.parametrize(
    ("missing", "named"),
    [({"layercode_api_key": None}, "LAYERCODE_API_KEY"), ({"layercode_agent_id": None}, "AGENT_ID")],
)
async def test_unconfigured_server_says_what_is_missing(
    make_app: AppFactory, api: FakeLayercodeAPI, missing: dict[str, Any], named: str
) -> None:
    async with make_app(**_configured(api, **missing)) as app:
        response = await app.http.post("/api/authorize", json={"agent_id": AGENT})
    assert response.status_code == 503
    assert named in response.json()["error"]
    assert api.calls == []


# --- The gates ------------------------------------------------------------------------------------


async def test_without_token_or_hook_only_loopback_clients_are_answered(
    settings_values: dict[str, Any], api: FakeLayercodeAPI
) -> None:
    (remote,) = await _post(_configured(api), settings_values, [{"json": {}}], client=("203.0.113.7", 40000))
    (local,) = await _post(_configured(api), settings_values, [{"json": {}}], client=("127.0.0.1", 40000))
    (mapped,) = await _post(_configured(api), settings_values, [{"json": {}}], client=("::ffff:127.0.0.1", 40000))
    assert remote.status_code == 403
    assert "AUTHORIZE_TOKEN" in remote.json()["error"] and "AUTHORIZE_HOOK" in remote.json()["error"]
    assert local.status_code == 200 and mapped.status_code == 200
    assert len(api.calls) == 2


async def test_token_gate_wants_the_exact_bearer_token(settings_values: dict[str, Any], api: FakeLayercodeAPI) -> None:
    token = "tok_" + "x" * 40
    responses = await _post(
        _configured(api, authorize_token=token),
        settings_values,
        [
            {"json": {}},
            {"json": {}, "headers": {"Authorization": f"Bearer {token[:-1]}y"}},
            {"json": {}, "headers": {"Authorization": f"Basic {token}"}},
            {"json": {}, "headers": {"Authorization": f"Bearer {token}"}},
        ],
        client=("203.0.113.7", 40000),  # A token admits callers from anywhere.
    )
    assert [response.status_code for response in responses] == [401, 401, 401, 200]
    assert all(response.headers["www-authenticate"] == "Bearer" for response in responses[:3])
    assert "missing" in responses[0].json()["error"] and "wrong" in responses[1].json()["error"]
    assert token not in "".join(response.text for response in responses[:3])
    assert len(api.calls) == 1


async def test_hook_metadata_wins_over_what_the_browser_claims(
    settings_values: dict[str, Any], api: FakeLayercodeAPI
) -> None:
    spoofed = {"user_id": "bob", "tenant": "evil", "theme": "dark"}
    responses = await _post(
        _configured(api, authorize_hook="tests.authorize_hooks:by_cookie"),
        settings_values,
        [
            {
                "json": {"metadata": spoofed, "custom_metadata": {"user_id": "bob"}},
                "headers": {"Cookie": "session=cookie-alice"},
            },
            {"json": {"metadata": spoofed}},  # No session cookie: the hook says no.
        ],
        client=("203.0.113.7", 40000),
    )
    assert responses[0].status_code == 200
    assert api.calls[0].body["metadata"] == {"user_id": "alice", "tenant": "acme", "theme": "dark"}
    assert api.calls[0].body["custom_metadata"] == {"user_id": "alice", "tenant": "acme"}
    assert responses[1].status_code == 403
    assert len(api.calls) == 1


async def test_hook_may_be_a_plain_function_and_refuse_with_its_own_reason(
    settings_values: dict[str, Any], api: FakeLayercodeAPI
) -> None:
    responses = await _post(
        _configured(api, authorize_hook="tests.authorize_hooks:by_header_sync"),
        settings_values,
        [{"json": {}, "headers": {"x-user": "carol"}}, {"json": {}, "headers": {"x-user": "banned"}}],
    )
    assert responses[0].status_code == 200
    assert api.calls[0].body["metadata"] == {"user_id": "carol"}
    assert responses[1].status_code == 401
    assert responses[1].json() == {"error": "this account is suspended"}


@pytest.mark.parametrize("hook", ["broken", "not_a_mapping"])
async def test_a_failing_hook_refuses_with_503_and_no_details(
    settings_values: dict[str, Any], api: FakeLayercodeAPI, hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    (response,) = await _post(
        _configured(api, authorize_hook=f"tests.authorize_hooks:{hook}"), settings_values, [{"json": {}}]
    )
    assert response.status_code == 503
    assert response.json() == {"error": "the authorization check failed"}
    assert "hunter2" not in response.text and "Traceback" not in response.text
    assert "AUTHORIZE_HOOK" in caplog.text  # The operator finds out from the log.
    assert api.calls == []


def test_a_hook_that_cannot_be_imported_stops_the_start(settings_values: dict[str, Any]) -> None:
    with pytest.raises(ImportError, match="no_such_hook"):
        create_app(Settings(**settings_values, authorize_hook="tests.authorize_hooks:no_such_hook"))


# --- The rate limit -------------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after(settings_values: dict[str, Any], api: FakeLayercodeAPI) -> None:
    responses = await _post(_configured(api, authorize_rate_limit="3/minute"), settings_values, [{"json": {}}] * 5)
    assert [response.status_code for response in responses] == [200, 200, 200, 429, 429]
    # The next request is due a third of a minute after the burst.
    assert 15 <= int(responses[3].headers["retry-after"]) <= 20
    assert "too many requests" in responses[3].json()["error"]
    assert len(api.calls) == 3


async def test_rate_limit_counts_each_signed_in_user_separately(
    settings_values: dict[str, Any], api: FakeLayercodeAPI
) -> None:
    alice = {"json": {}, "headers": {"Cookie": "session=cookie-alice"}}
    bob = {"json": {}, "headers": {"Cookie": "session=cookie-bob"}}
    responses = await _post(
        _configured(api, authorize_hook="tests.authorize_hooks:by_cookie", authorize_rate_limit="2/hour"),
        settings_values,
        [alice, alice, alice, bob, bob, bob],  # All from the same IP: the users' allowances are their own.
    )
    assert [response.status_code for response in responses] == [200, 200, 429, 200, 200, 429]


async def test_failed_attempts_use_up_the_allowance_of_their_ip(
    settings_values: dict[str, Any], api: FakeLayercodeAPI
) -> None:
    wrong = {"json": {}, "headers": {"Authorization": "Bearer guess"}}
    right = {"json": {}, "headers": {"Authorization": "Bearer tok_right"}}
    responses = await _post(
        _configured(api, authorize_token="tok_right", authorize_rate_limit="3/hour"),
        settings_values,
        [wrong, wrong, wrong, wrong, right],
    )
    assert [response.status_code for response in responses] == [401, 401, 401, 429, 429]
    assert api.calls == []


async def test_a_store_that_is_down_refuses_no_one_else_and_names_no_address(
    settings_values: dict[str, Any], api: FakeLayercodeAPI
) -> None:
    port = free_port()  # Nothing listens there: every store call fails at once.
    store = {"conversation_store": f"redis://127.0.0.1:{port}/0", "authorize_rate_limit": "3/hour"}
    responses = await _post(
        _configured(api, authorize_token="tok_right", **store),
        settings_values,
        [{"json": {}}, {"json": {}, "headers": {"Authorization": "Bearer guess"}}]
        + [{"json": {}, "headers": {"Authorization": "Bearer tok_right"}}],
    )
    # The gate decides first: a refused caller is told so, whether or not its attempt could be counted...
    assert [response.status_code for response in responses] == [401, 401, 503]
    # ...and an admitted one, whose allowance the store must check, hears the store is down, not where it is.
    assert responses[2].json() == {"error": "conversation store unavailable"}
    assert all(str(port) not in response.text for response in responses)
    assert api.calls == []


async def test_rate_limit_off(settings_values: dict[str, Any], api: FakeLayercodeAPI) -> None:
    responses = await _post(_configured(api, authorize_rate_limit="off"), settings_values, [{"json": {}}] * 12)
    assert {response.status_code for response in responses} == {200}


def test_rate_limit_setting_is_checked_at_start() -> None:
    with pytest.raises(ValueError, match="N/minute"):
        Settings(_env_file=None, authorize_rate_limit="lots")  # pyright: ignore[reportCallIssue]


# --- Layercode's answers and bad bodies ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "answered"),
    [(400, "invalid agent ID", 400), (402, "insufficient balance", 402), (500, "internal error", 502)],
)
async def test_layercode_errors_are_passed_on(
    make_app: AppFactory, api: FakeLayercodeAPI, status: int, message: str, answered: int
) -> None:
    api.next_status, api.next_error = status, message
    async with make_app(**_configured(api)) as app:
        response = await app.http.post("/api/authorize", json={})
    assert response.status_code == answered
    assert response.json() == {"error": message}


async def test_wrong_api_key_is_reported_from_layercode(make_app: AppFactory, api: FakeLayercodeAPI) -> None:
    async with make_app(**_configured(api, layercode_api_key="wrong")) as app:
        response = await app.http.post("/api/authorize", json={})
    assert response.status_code == 400
    assert "bearer" in response.json()["error"]


async def test_unreachable_api_is_502(make_app: AppFactory, api: FakeLayercodeAPI) -> None:
    async with make_app(**_configured(api, layercode_api_url=f"http://127.0.0.1:{free_port()}")) as app:
        response = await app.http.post("/api/authorize", json={})
    assert response.status_code == 502
    assert "unreachable" in response.json()["error"]


async def test_slow_api_is_504(make_app: AppFactory, api: FakeLayercodeAPI) -> None:
    api.delay = 2.0
    async with make_app(**_configured(api, authorize_timeout=0.2)) as app:
        response = await app.http.post("/api/authorize", json={})
    assert response.status_code == 504


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{nope", "JSON"),
        (b"[1]", "object"),
        (b'{"metadata": "x"}', "metadata must be a JSON object"),
        (b'{"conversation_id": 5}', "conversation_id must be a string"),
        # Read by the same parser as the webhook's: too deep for the decoder (once a 500), deeper than it allows,
        # or text that is not Unicode.
        (b'{"metadata": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "nested too deeply"),
        (b'{"metadata": {"a": ' + b"[" * 100 + b"]" * 100 + b"}}", "nested too deeply"),
        (b'{"conversation_id": "c\\ud800"}', "conversation_id: "),
        (b"\xff", "UTF-8"),
    ],
)
async def test_bad_bodies_are_400(make_app: AppFactory, api: FakeLayercodeAPI, body: bytes, fragment: str) -> None:
    async with make_app(**_configured(api)) as app:
        response = await app.http.post("/api/authorize", content=body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid body"
    assert fragment in response.json()["reason"]
    assert api.calls == []


async def test_health(make_app: AppFactory) -> None:
    async with make_app() as app:
        response = await app.http.get("/health")
    assert response.json() == {"status": "ok"}
