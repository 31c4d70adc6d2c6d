"""No secret ever leaves the service: not in a log line, an error body, a header, the banner, a span or a repr.

Every secret gets a distinctive random value (its name, then 32 random hex digits, so a leak names itself). The
real `layercode-agent serve` runs at `LOG_LEVEL=debug` against the local fakes (an OpenAI-compatible LLM,
Layercode's REST API, an OTLP collector) and a real `redis-server` that requires a password. Every path is
exercised: good, tampered, wrongly signed and unsigned webhooks, an LLM failure, a genuine unhandled error, the
authorize proxy with Layercode succeeding and failing, the admin API with the right and a wrong token, the
playground proxy, a store outage. Then everything the outside world could see (the server's stdout and stderr,
every response body and header, every span the collector received) is searched for each secret, and for the
random part alone, so a truncated repr counts too. Error bodies must not carry a traceback.

`LOGFIRE_TOKEN` is never given to a serving process (Logfire would send spans to its cloud); the settings
checks below cover it.
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from pydantic import SecretStr

from layercode_agent.cli import main
from layercode_agent.client import WebhookClient
from layercode_agent.config import Settings, resolve_webhook_secrets
from layercode_agent.protocol import SIGNATURE_HEADER, sign, verify
from layercode_agent.redact import redact_url
from layercode_agent.server import Runtime, create_app
from layercode_agent.stores import RedisStore, StoreError, open_store
from layercode_agent.telemetry import configure_tracing

from ..fakes.layercode_api import FakeLayercodeAPI
from ..fakes.net import free_port
from ..fakes.openai_server import FakeOpenAI, Reply
from ..fakes.otlp_collector import FakeCollector
from ..fakes.redis_server import RedisServer
from ..fakes.server_process import ServerProcess, server_env

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
AGENT_ID = "ag_hygiene"
TRACE_MARKERS = ("Traceback", '.py", line', 'File "')

SECRET_NAMES = (
    "WEBHOOK_SECRET_OLD",
    "WEBHOOK_SECRET_NEW",
    "LAYERCODE_API_KEY",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "GEMINI_API_KEY",
    "LOGFIRE_TOKEN",
    "OTLP_HEADER_KEY",
    "OTLP_MALFORMED_BEARER",
    "ADMIN_TOKEN",
    "AUTHORIZE_TOKEN",
    "REDIS_PASSWORD",
)


def make_secrets() -> dict[str, str]:
    """A fresh distinctive value per secret, plus the `client_session_key` Layercode will hand out."""
    values = {name: f"{name}_{secrets.token_hex(16)}" for name in SECRET_NAMES}
    values["CLIENT_SESSION_KEY"] = f"lc_sesskey_{secrets.token_hex(16)}"
    return values


def secret_env(values: dict[str, str]) -> dict[str, str]:
    """Every secret setting, as a user would put them in the environment."""
    return {
        "LAYERCODE_WEBHOOK_SECRET": f"{values['WEBHOOK_SECRET_OLD']},{values['WEBHOOK_SECRET_NEW']}",
        "LAYERCODE_API_KEY": values["LAYERCODE_API_KEY"],
        "OPENAI_API_KEY": values["OPENAI_API_KEY"],
        "ANTHROPIC_API_KEY": values["ANTHROPIC_API_KEY"],
        "GOOGLE_GENERATIVE_AI_API_KEY": values["GEMINI_API_KEY"],
        # One valid header, and one written the way people often get wrong (`: ` instead of `=`), which
        # OpenTelemetry would quote in a warning.
        "OTEL_EXPORTER_OTLP_HEADERS": (
            f"x-collector-key={values['OTLP_HEADER_KEY']},Authorization: Bearer {values['OTLP_MALFORMED_BEARER']}"
        ),
        "ADMIN_TOKEN": values["ADMIN_TOKEN"],
        "AUTHORIZE_TOKEN": values["AUTHORIZE_TOKEN"],
    }


def fragments(value: str) -> tuple[str, ...]:
    """The value, its random part, and both ends of that (a truncated repr shows only part of a value)."""
    random = value.rsplit("_", 1)[1]
    return value, random, random[:12], random[-12:]


class Captured:
    """Everything the outside world saw, labelled by where it was seen."""

    def __init__(self) -> None:
        self.outputs: list[tuple[str, str]] = []
        self.errors: list[tuple[str, int, str]] = []
        """`(where, status, body)` of every response with status 400 or more."""

    def add(self, where: str, text: str) -> None:
        self.outputs.append((where, text))

    def response(self, where: str, response: httpx.Response) -> httpx.Response:
        self.add(f"{where}: body", response.text)
        self.add(f"{where}: headers", "\n".join(f"{name}: {value}" for name, value in response.headers.items()))
        if response.status_code >= 400:
            self.errors.append((where, response.status_code, response.text))
        return response

    def leaks(self, values: dict[str, str], *, allowed: frozenset[str] = frozenset()) -> list[str]:
        """`"<secret> in <where>"` for every secret seen anywhere not in `allowed`."""
        return [
            f"{name} in {where}"
            for where, text in self.outputs
            if where not in allowed
            for name, value in values.items()
            if any(piece in text for piece in fragments(value))
        ]


def assert_no_trace(captured: Captured) -> None:
    for where, status, body in captured.errors:
        for marker in TRACE_MARKERS:
            assert marker not in body, f"{status} body of {where} contains {marker!r}: {body[:300]}"


# --- The real server --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_no_secret_reaches_any_output_of_the_real_server(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    values = make_secrets()
    new_secret = SecretStr(values["WEBHOOK_SECRET_NEW"])
    captured = Captured()
    with (
        FakeLayercodeAPI(api_key=values["LAYERCODE_API_KEY"], session_key=values["CLIENT_SESSION_KEY"]) as api,
        FakeCollector() as collector,
        RedisServer(password=values["REDIS_PASSWORD"]) as redis,
    ):
        env = {
            **server_env(
                fake_llm,
                tmp_path / "data",
                secret=f"{values['WEBHOOK_SECRET_OLD']},{values['WEBHOOK_SECRET_NEW']}",
                welcome="Welcome to the hygiene test.",
                store_url=f"{redis.url}?prefix=hygiene:",
            ),
            **secret_env(values),
            "LOG_LEVEL": "debug",
            "LAYERCODE_API_URL": api.url,
            "LAYERCODE_AGENT_ID": AGENT_ID,
            "AUTHORIZE_RATE_LIMIT": "off",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.base_url,
            "DATA_HANDLER": "exploding_data_handler:handle",
            "PYTHONPATH": str(FIXTURES),
            "PLAYGROUND": "true",
        }
        server = ServerProcess(env, cwd=tmp_path)
        with server:
            async with httpx.AsyncClient(timeout=60) as http:
                client = WebhookClient(server.url, new_secret, http=http)
                await exercise(http, server, client, captured, values, fake_llm=fake_llm, api=api)
                # The store goes away: its errors become 503s that name the server, never the password.
                redis.stop()
                admin = {"authorization": f"Bearer {values['ADMIN_TOKEN']}"}
                listed = await http.get(f"{server.base}/api/conversations", headers=admin)
                outage = captured.response("admin list during a store outage", listed)
                ended = captured.response("session.end during a store outage", await client.end())
        # Stopped: the log is complete and the spans are flushed to the collector.
        log = server.log
        captured.add("server stdout+stderr", log)
        for span in collector.spans:
            captured.add(f"span {span.name}", json.dumps([span.name, span.attributes, span.resource]))
        received_headers = [span.headers for span in collector.spans]
    openai_authorization = {request.headers.get("authorization") for request in fake_llm.received}

    # None of it shows a secret, or a traceback in an error body.
    session_body = "authorize: success: body"
    secret_values = {name: value for name, value in values.items() if name != "CLIENT_SESSION_KEY"}
    assert captured.leaks(secret_values) == []
    session_key = {"CLIENT_SESSION_KEY": values["CLIENT_SESSION_KEY"]}
    assert captured.leaks(session_key, allowed=frozenset({session_body})) == []
    assert_no_trace(captured)

    # And the test saw what it meant to: the secrets were in use, and every path ran.
    assert openai_authorization == {f"Bearer {values['OPENAI_API_KEY']}"}
    assert {call.authorization for call in api.calls} == {f"Bearer {values['LAYERCODE_API_KEY']}"}
    assert collector.spans, "no span reached the collector"
    assert all(headers.get("x-collector-key") == values["OTLP_HEADER_KEY"] for headers in received_headers)
    assert "layercode-agent" in log and "is starting" in log  # The banner...
    assert f"redis://:***@127.0.0.1:{redis.port}/0?prefix=hygiene:" in log  # ...shows the store, not its password.
    assert "HandlerExplodedError: the data handler exploded on purpose" in log  # The log keeps the traceback.
    assert "Header format invalid" in log and "<not shown: it may hold a credential>" in log
    assert outage.status_code == 503 and ended.status_code == 503, (outage.text, ended.text)
    assert {401, 400, 422, 500, 503} <= {status for _, status, _ in captured.errors}
    assert values["CLIENT_SESSION_KEY"] in dict(captured.outputs)[session_body]


async def exercise(
    http: httpx.AsyncClient,
    server: ServerProcess,
    client: WebhookClient,
    captured: Captured,
    values: dict[str, str],
    *,
    fake_llm: FakeOpenAI,
    api: FakeLayercodeAPI,
) -> None:
    """Every path a request can take, each response recorded in `captured`."""
    base = server.base
    ok = captured.response("health", await http.get(f"{base}/health"))
    assert ok.status_code == 200

    # Webhooks, signed well: with the new secret, and with the old one during a rotation.
    started = await client.start()
    captured.add("session.start: body", started.body.decode())
    captured.add("session.start: headers", json.dumps(started.headers))
    answered = await client.say("Hello, who is this?")
    captured.add("message: body", answered.body.decode())
    captured.add("message: headers", json.dumps(answered.headers))
    assert answered.status == 200 and answered.types[-1] == "response.end", answered.body
    assert "Hello there" in answered.text
    old = WebhookClient(server.url, values["WEBHOOK_SECRET_OLD"], conversation_id=client.conversation_id, http=http)
    rotated = captured.response("data signed with the old secret", await old.data({"page": 1}))
    assert rotated.status_code == 200, rotated.text

    # Webhooks that must be refused, and bodies that are not events.
    raw = json.dumps(client.body("message", text="Tampered"), separators=(",", ":")).encode()
    good = sign(raw, SecretStr(values["WEBHOOK_SECRET_NEW"]))
    refused = {
        "tampered body": (raw.replace(b"Tampered", b"Tampere!"), good),
        "wrong secret": (raw, sign(raw, f"WRONG_{secrets.token_hex(16)}")),
        "malformed header": (raw, "t=soon,v1=nothex"),
    }
    for where, (content, header) in refused.items():
        response = await http.post(client.url, content=content, headers={SIGNATURE_HEADER: header})
        assert captured.response(where, response).status_code == 401
    missing = await http.post(client.url, content=raw, headers={"content-type": "application/json"})
    assert captured.response("missing header", missing).status_code == 401
    for where, content, status in (
        ("not JSON", b"{not json", 400),
        ("not an event", b'{"type":"message","text":42}', 422),
    ):
        response = await client.post(content)
        assert captured.response(where, response).status_code == status, response.text

    # The LLM fails (every retry of the OpenAI client too): the caller hears an apology.
    fake_llm.default = Reply(fail="http500")
    try:
        failed = await client.say("Are you still there?")
    finally:
        fake_llm.default = Reply()
    captured.add("LLM failure: body", failed.body.decode())
    assert "Sorry" in failed.text, failed.body

    # Client data, answered; then a genuine unhandled error in the user's data handler.
    answered_data = captured.response("data", await client.data({"choice": "blue"}))
    assert answered_data.status_code == 200, answered_data.text
    # On a connection of its own: after an unhandled error the server closes the connection it came on.
    async with httpx.AsyncClient(timeout=60) as lone:
        alone = WebhookClient(client.url, client.secret, conversation_id=client.conversation_id, http=lone)
        exploded = captured.response("data handler failure", await alone.data({"explode": True}))
    assert exploded.status_code == 500
    assert exploded.text == "Internal Server Error"

    # The playground signs with the server's own secret; its answer must not carry it.
    page = captured.response("playground page", await http.get(f"{base}/playground"))
    assert page.status_code == 200
    proxied = await http.post(
        f"{base}/playground/api/agent",
        content=json.dumps(client.body("message", text="Hi from the page")),
        headers={"content-type": "application/json"},
    )
    assert captured.response("playground proxy", proxied).status_code == 200, proxied.text

    # /api/authorize: refused callers, Layercode saying yes, Layercode saying no.
    authorize = f"{base}/api/authorize"
    body = {"agent_id": AGENT_ID}
    bearer = {"authorization": f"Bearer {values['AUTHORIZE_TOKEN']}"}
    wrong = {"authorization": f"Bearer WRONG_{secrets.token_hex(16)}"}
    for where, headers in (("no token", {}), ("wrong token", wrong)):
        response = await http.post(authorize, json=body, headers=headers)
        assert captured.response(f"authorize: {where}", response).status_code == 401, response.text
    success = captured.response("authorize: success", await http.post(authorize, json=body, headers=bearer))
    assert success.status_code == 200, success.text
    for status, message in ((401, "invalid API key"), (500, "internal error")):
        api.next_status, api.next_error = status, message
        response = await http.post(authorize, json=body, headers=bearer)
        failure = captured.response(f"authorize: Layercode {status}", response)
        assert failure.status_code >= 400, failure.text  # Layercode's 5xx may be relayed as 502.

    # The admin API, with the right token, a wrong one and none.
    admin = f"{base}/api/conversations"
    right = {"authorization": f"Bearer {values['ADMIN_TOKEN']}"}
    listed = captured.response("admin list", await http.get(admin, headers=right))
    assert listed.status_code == 200, listed.text
    detail = captured.response("admin detail", await http.get(f"{admin}/{client.conversation_id}", headers=right))
    assert detail.status_code == 200, detail.text
    assert captured.response("admin: wrong token", await http.get(admin, headers=wrong)).status_code == 401
    assert captured.response("admin: no token", await http.get(admin)).status_code == 401

    ended = captured.response("session.end", await client.end())
    assert ended.status_code == 200, ended.text
    metrics = captured.response("metrics", await http.get(f"{base}/metrics"))
    assert metrics.status_code == 200


@pytest.mark.slow
def test_sign_prints_the_header_never_the_secret(tmp_path: Path) -> None:
    values = make_secrets()
    body = tmp_path / "body.json"
    body.write_bytes(b'{"type":"message","conversation_id":"c","text":"hi"}')
    env = {"PATH": str(Path(sys.executable).parent), **secret_env(values), "DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [sys.executable, "-m", "layercode_agent", "sign", "--file", str(body)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    captured = Captured()
    captured.add("sign stdout", done.stdout)
    captured.add("sign stderr", done.stderr)
    assert captured.leaks(values) == []
    # It signed with the first configured secret.
    assert verify(body.read_bytes(), done.stdout.strip(), values["WEBHOOK_SECRET_OLD"]) > 0


# --- The settings and the objects built from them ------------------------------------------------------


def all_settings(values: dict[str, str], tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with every secret set (`overrides` win), ignoring any `.env`."""
    fields: dict[str, Any] = {
        "layercode_webhook_secret": SecretStr(f"{values['WEBHOOK_SECRET_OLD']},{values['WEBHOOK_SECRET_NEW']}"),
        "layercode_api_key": SecretStr(values["LAYERCODE_API_KEY"]),
        "openai_api_key": SecretStr(values["OPENAI_API_KEY"]),
        "anthropic_api_key": SecretStr(values["ANTHROPIC_API_KEY"]),
        "gemini_api_key": SecretStr(values["GEMINI_API_KEY"]),
        "logfire_token": SecretStr(values["LOGFIRE_TOKEN"]),
        "otel_exporter_otlp_headers": SecretStr(f"x-collector-key={values['OTLP_HEADER_KEY']}"),
        "admin_token": SecretStr(values["ADMIN_TOKEN"]),
        "authorize_token": SecretStr(values["AUTHORIZE_TOKEN"]),
        "conversation_store": f"redis://:{values['REDIS_PASSWORD']}@127.0.0.1:6379/0",
        "data_dir": tmp_path,
    }
    # pyright sees the __init__ synthesised from the fields, not BaseSettings' source keywords.
    return Settings(_env_file=None, **{**fields, **overrides})  # pyright: ignore[reportCallIssue]


def test_settings_and_webhook_secrets_never_show_a_value(tmp_path: Path) -> None:
    values = make_secrets()
    settings = all_settings(values, tmp_path)
    webhook = resolve_webhook_secrets(settings)
    assert [value.get_secret_value() for value in webhook.values] == [
        values["WEBHOOK_SECRET_OLD"],
        values["WEBHOOK_SECRET_NEW"],
    ]
    captured = Captured()
    for name, shown in (("Settings", settings), ("WebhookSecrets", webhook), ("values", webhook.values)):
        captured.add(f"repr({name})", repr(shown))
        captured.add(f"str({name})", str(shown))
    captured.add("redacted store URL", redact_url(settings.store_url))
    assert captured.leaks(values) == []
    # A dump is data, not display: it keeps the store URL whole (to rebuild the settings), every key masked.
    dumped = Captured()
    dumped.add("model_dump", str(settings.model_dump()))
    dumped.add("model_dump_json", settings.model_dump_json())
    assert dumped.leaks({name: value for name, value in values.items() if name != "REDIS_PASSWORD"}) == []


def test_settings_repr_hides_the_store_password(tmp_path: Path) -> None:
    values = make_secrets()
    settings = all_settings(values, tmp_path)
    assert values["REDIS_PASSWORD"] not in repr(settings)
    assert values["REDIS_PASSWORD"] not in str(settings)


async def test_the_runtime_and_client_never_show_a_value(tmp_path: Path) -> None:
    values = make_secrets()
    captured = Captured()
    with RedisServer(password=values["REDIS_PASSWORD"]) as redis:
        # With a Logfire token the app would send spans to Logfire's cloud; tests reach nothing but 127.0.0.1.
        settings = all_settings(
            values, tmp_path, conversation_store=redis.url, agent_model="test", metrics=False, logfire_token=None
        )
        app = create_app(settings)
        async with LifespanManager(app):
            runtime: Runtime = app.state.runtime
            assert all(isinstance(secret, SecretStr) for secret in runtime.secrets)
            captured.add("repr(Runtime)", repr(runtime))
            captured.add("str(Runtime)", str(runtime))
            captured.add("store description", runtime.store_description)
    client = WebhookClient("http://127.0.0.1:9/api/agent", values["WEBHOOK_SECRET_NEW"])
    captured.add("vars(WebhookClient)", str(vars(client)))
    await client.aclose()
    assert captured.leaks(values) == []


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"PORT": "not-a-port"}, "PORT"),
        # pydantic's own message for a model-level check quotes every setting given, secrets unmasked.
        ({"CORS_ALLOW_ORIGINS": "*", "CORS_ALLOW_CREDENTIALS": "true"}, "CORS_ALLOW_CREDENTIALS"),
    ],
)
def test_invalid_settings_are_reported_without_any_value(
    bad: dict[str, str],
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    values = make_secrets()
    monkeypatch.chdir(tmp_path)  # No developer's .env.
    for name, value in {**secret_env(values), "LOGFIRE_TOKEN": values["LOGFIRE_TOKEN"]}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONVERSATION_STORE", f"redis://:{values['REDIS_PASSWORD']}@127.0.0.1:6379/0")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    for name, value in bad.items():
        monkeypatch.setenv(name, value)
    assert main(["serve"]) == 2
    out, err = capsys.readouterr()
    assert "Cannot start" in err and named in err
    captured = Captured()
    captured.add("serve stdout", out)
    captured.add("serve stderr", err)
    assert captured.leaks(values) == []
    assert "Traceback" not in err


# --- Store URLs and driver errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "memory://:{pw}@somewhere",
        ":{pw}@127.0.0.1:6379/0",
        "sqlite://:{pw}@host/x.db",
        "postgres://user:{pw}@127.0.0.1/db",
        "redis://:{pw}@127.0.0.1:6379/x",
        "redis://:{pw}@127.0.0.1:6379/0?prefix=",
        "redis://:{pw}@127.0.0.1:6379/0?no_such_option=1",
        "redis://127.0.0.1:6379/0?password={pw}&no_such_option=1",
    ],
)
def test_store_url_errors_never_repeat_the_password(url: str) -> None:
    password = f"REDIS_PASSWORD_{secrets.token_hex(16)}"
    with pytest.raises(StoreError) as raised:
        open_store(url.format(pw=password))
    assert password not in str(raised.value)
    assert password[-12:] not in str(raised.value)


async def test_redis_driver_errors_and_descriptions_never_show_the_password() -> None:
    password = f"REDIS_PASSWORD_{secrets.token_hex(16)}"
    store = RedisStore(f"redis://user:{password}@127.0.0.1:{free_port()}/0?socket_connect_timeout=1")
    with pytest.raises(StoreError) as raised:
        await store.read_record("c")
    shown = " ".join([str(raised.value), store.description, repr(store)])
    await store.aclose()
    assert "unreachable" in str(raised.value)
    assert password not in shown and password[-12:] not in shown


async def test_redis_refusing_the_password_does_not_repeat_it() -> None:
    with RedisServer(password=f"REDIS_PASSWORD_{secrets.token_hex(16)}") as redis:
        guess = f"WRONG_PASSWORD_{secrets.token_hex(16)}"
        store = open_store(f"redis://:{guess}@127.0.0.1:{redis.port}/0")
        with pytest.raises(StoreError) as raised:
            await store.read_record("c")
        await store.aclose()
    assert guess not in str(raised.value)
    assert redis.password is not None and redis.password not in str(raised.value)


# --- Telemetry -----------------------------------------------------------------------------------------


def test_a_malformed_otlp_header_is_never_quoted(caplog: pytest.LogCaptureFixture) -> None:
    token = f"OTLP_MALFORMED_BEARER_{secrets.token_hex(16)}"
    caplog.set_level(logging.WARNING)
    tracing = configure_tracing(
        otlp_traces_endpoint=f"http://127.0.0.1:{free_port()}/v1/traces",
        otlp_headers=SecretStr(f"Authorization: Bearer {token}"),
    )
    assert tracing is not None
    tracing.shutdown()
    assert "Header format invalid" in caplog.text
    assert token not in caplog.text and token[-12:] not in caplog.text
