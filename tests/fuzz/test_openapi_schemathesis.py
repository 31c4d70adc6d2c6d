"""Schemathesis against the app's own OpenAPI description: every operation, with valid and invalid inputs.

The app serves no description in production (`openapi_url=None`), but `app.openapi()` still builds it from the
routes, so the test loads that dict. The app is built with every optional router on (admin API, metrics, authorize
against the local Layercode API fake on 127.0.0.1) and reached in-process through schemathesis' ASGI transport,
which runs its lifespan. Admin and authorize calls carry the bearer token; webhook bodies are signed over the exact
bytes sent (a `requests` auth hook), so generated events get past the signature to the parser and the turn runner.

Checks: no 5xx; the documented status codes, content types, headers and body schemas (SSE events included); valid
data accepted; invalid data refused, except by the webhook, which accepts unknown event types and fields on purpose
(Layercode's protocol drifts). Examples are bounded and derandomised, so CI runs the same cases every time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import requests
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from pydantic_ai.models.function import FunctionModel
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from layercode_agent.agent import build_agent
from layercode_agent.config import Settings
from layercode_agent.protocol import SIGNATURE_HEADER, sign
from layercode_agent.server import create_app

from ..fakes.layercode_api import API_KEY, FakeLayercodeAPI
from ..server.conftest import SECRET, words
from .strategies import EVENT_CLASSES

ADMIN_TOKEN: Final = "admin-token-for-fuzzing"
AGENT_ID: Final = "ag_fuzz"
WEBHOOK: Final = "/api/agent"

EXAMPLES: Final = {WEBHOOK: 250}
"""Examples per operation and mode: the webhook is the attack surface, the other routes take few inputs."""
DEFAULT_EXAMPLES: Final = 60

COMMON_CHECKS: Final[list[CheckFunction]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

AUTHORIZE: Final = "/api/authorize"
LENIENT: Final = {WEBHOOK}
"""Routes that accept some bodies their description calls invalid, so `negative_data_rejection` does not apply: the
webhook, on purpose (unknown event types and fields)."""


def fuzz_settings(data_dir: Path, layercode_api_url: str) -> Settings:
    return Settings(
        layercode_webhook_secret=SecretStr(SECRET),
        conversation_store="memory://",
        data_dir=data_dir,
        welcome_message="Welcome aboard.",
        metrics=True,
        admin_token=SecretStr(ADMIN_TOKEN),
        # One bearer token opens the admin API and /api/authorize; no rate limit, so fuzzing is not a run of 429s.
        authorize_token=SecretStr(ADMIN_TOKEN),
        authorize_rate_limit="off",
        layercode_api_key=SecretStr(API_KEY),
        layercode_api_url=layercode_api_url,
        layercode_agent_id=AGENT_ID,
    )


def build_app(data_dir: Path, layercode_api_url: str) -> FastAPI:
    agent = build_agent(model=FunctionModel(stream_function=words))
    return create_app(fuzz_settings(data_dir, layercode_api_url), agent=agent)


def describe() -> dict[str, Any]:
    """The app's OpenAPI description; building the app runs no lifespan and opens no connection."""
    return build_app(Path("unused"), "http://127.0.0.1:9").openapi()


def negatable(operation: dict[str, Any]) -> bool:
    """Whether invalid input exists: a body, or any parameter but a free-form string in the path."""
    parameters: list[dict[str, Any]] = operation.get("parameters", [])
    return "requestBody" in operation or any(
        parameter["in"] != "path"
        or {key: value for key, value in parameter["schema"].items() if key != "title"} != {"type": "string"}
        for parameter in parameters
    )


def operation_cases() -> list[Any]:
    """A case per operation described and per mode: `"METHOD /path"` with valid, and invalid when possible."""
    cases: list[Any] = []
    for path, operations in describe()["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            modes = [GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if negatable(operation) else [])]
            for mode in modes:
                kind = "valid" if mode is GenerationMode.POSITIVE else "invalid"
                cases.append(pytest.param(label, mode, id=f"{label} {kind}"))
    return cases


CASES: Final = operation_cases()


def sign_webhook(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """A `requests` auth hook: sign the exact body bytes about to be sent, as Layercode would."""
    body: object = request.body
    assert body is None or isinstance(body, bytes | str), f"cannot sign a {type(body).__name__} body"
    raw = body.encode() if isinstance(body, str) else body or b""
    request.headers[SIGNATURE_HEADER] = sign(raw, SECRET)
    return request


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenApiSchema]:
    with FakeLayercodeAPI() as layercode_api:
        app = build_app(tmp_path_factory.mktemp("fuzz"), layercode_api.url)
        # A copy: FastAPI caches the description on the app, and schemathesis may annotate what it is given.
        schema = schemathesis.openapi.from_dict(copy.deepcopy(app.openapi()), config=schemathesis.Config())
        schema.app = app  # Calls go to the app in-process; schemathesis starts its lifespan on the first one.
        try:
            yield schema
        finally:
            shutdown_lifespans()


def test_the_description_covers_every_route_and_documents_the_webhook() -> None:
    description = describe()
    operations = {f"{method.upper()} {path}" for path, methods in description["paths"].items() for method in methods}
    assert operations >= {
        "POST /api/agent",
        "POST /api/authorize",
        "GET /health",
        "GET /metrics",
        "GET /api/conversations",
        "GET /api/conversations/{conversation_id}",
        "DELETE /api/conversations/{conversation_id}",
    }
    webhook: dict[str, Any] = description["paths"][WEBHOOK]["post"]
    assert [(p["name"], p["in"], p["required"]) for p in webhook["parameters"]] == [(SIGNATURE_HEADER, "header", True)]
    assert set(webhook["responses"]) == {"200", "400", "401", "413", "422", "429", "503"}
    assert set(webhook["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    # The hand-written body schema names exactly the fields the inbound models read, event type by event type.
    variants: list[dict[str, Any]] = webhook["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    described = {variant["properties"]["type"]["const"]: set(variant["properties"]) for variant in variants}
    assert described == {tag: set(model.model_fields) for tag, model in EVENT_CLASSES.items()}


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_operation_conforms_to_its_description(api_schema: OpenApiSchema, label: str, mode: GenerationMode) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None
    is_webhook = operation.path == WEBHOOK
    checks = [*COMMON_CHECKS]
    if mode is GenerationMode.POSITIVE:
        checks.append(positive_data_acceptance)
    elif operation.path not in LENIENT:
        checks.append(negative_data_rejection)
    auth = sign_webhook if is_webhook else None
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    statuses: list[int] = []

    @settings(
        max_examples=EXAMPLES.get(operation.path, DEFAULT_EXAMPLES),
        deadline=None,
        derandomize=True,
        database=None,
        # Generation time varies with the machine while the cases do not: never fail on it.
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Case) -> None:
        response = case.call(headers=headers, auth=auth)
        statuses.append(response.status_code)
        case.validate_response(response, checks=checks)

    check()
    assert statuses, "no request was sent"
    if is_webhook:
        # Every body passed the signature, so the parser (and, for valid events, the handlers) were fuzzed too.
        assert 401 not in statuses
        assert mode is GenerationMode.NEGATIVE or set(statuses) == {200}


def test_a_stored_conversation_reads_back_as_described(api_schema: OpenApiSchema) -> None:
    # Random ids never hit a stored conversation, so the documented 200 of the admin reads is checked here.
    webhook = api_schema.find_operation_by_label(f"POST {WEBHOOK}")
    read = api_schema.find_operation_by_label("GET /api/conversations/{conversation_id}")
    listing = api_schema.find_operation_by_label("GET /api/conversations")
    assert webhook is not None and read is not None and listing is not None
    said = webhook.Case(body={"type": "message", "conversation_id": "conv_known", "text": "hi", "turn_id": "t1"})
    assert said.call(auth=sign_webhook).status_code == 200
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for case in (read.Case(path_parameters={"conversation_id": "conv_known"}), listing.Case(query={"limit": 5})):
        response = case.call(headers=headers)
        assert response.status_code == 200 and "conv_known" in response.text
        case.validate_response(response, checks=COMMON_CHECKS)


# --- Found by fuzzing: authorize once accepted null where its description did not allow it ---------------------------


@pytest.mark.parametrize("field", ["conversation_id", "sdk_version", "metadata", "custom_metadata"])
def test_authorize_accepts_null_only_where_its_description_allows_it(api_schema: OpenApiSchema, field: str) -> None:
    operation = api_schema.find_operation_by_label(f"POST {AUTHORIZE}")
    assert operation is not None
    case = operation.Case(body={field: None}, media_type="application/json")
    response = case.call(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    declared: dict[str, Any] = api_schema.raw_schema["paths"][AUTHORIZE]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]["properties"][field]
    types = declared.get("type")
    allows_null = "null" in types if isinstance(types, list) else types == "null"
    assert (response.status_code == 200) == allows_null, response.text
