"""The webhook through HTTP against the real app: any body and any `layercode-signature` get a clean 4xx.

The app is the one `tests/server` builds (`make_app`: `create_app` with `Settings`, its lifespan run by
`asgi_lifespan`, requests through `httpx.ASGITransport`), with a pydantic-ai `FunctionModel` that counts its calls.
A rejected request must never reach the model nor write to the store; every request must be answered within a few
seconds. Hypothesis runs each property's examples on one app (anyio's pytest plugin runs async `@given` tests), with
a fixed seed and a bounded number of examples.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo

from layercode_agent.protocol import SIGNATURE_HEADER, PayloadError, SSEParser, parse_event, sign
from layercode_agent.stores.memory import MemoryStore

from ..server.conftest import SECRET, App, AppFactory
from .strategies import almost_valid_headers, bodies_with_a_lone_surrogate, genuine_headers, json_event_bodies

pytestmark = pytest.mark.anyio

ANSWER_WITHIN: Final = 5.0
"""Seconds any request may take; a hang fails the example instead of the whole run."""

HTTP_PROPERTY: Final = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    # One app serves all the examples of a test (a fixture of the test, not of each example), on purpose; and
    # generation time varies with the machine while the cases do not.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Served:
    """The app under test and the conversations its model was asked to continue."""

    app: App
    llm_calls: list[int] = field(default_factory=list[int])

    @property
    def store(self) -> MemoryStore:
        store = self.app.runtime.runner.store
        assert isinstance(store, MemoryStore)
        return store

    def store_state(self) -> dict[str, Any]:
        """Every container the in-memory store keeps (conversations, messages, session events, markers), copied."""
        state = vars(self.store).items()
        return {name: copy.deepcopy(value) for name, value in state if isinstance(value, dict | list)}

    async def post(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> httpx.Response:
        with anyio.fail_after(ANSWER_WITHIN):
            return await self.app.http.post("/api/agent", content=body, headers=headers)


@pytest.fixture
async def served(make_app: AppFactory) -> AsyncIterator[Served]:
    calls: list[int] = []

    async def counting(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        calls.append(len(messages))
        yield "Noted."

    async with make_app(counting) as app:
        yield Served(app, calls)


content_types = st.sampled_from(
    [None, "application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
special_numbers = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 2**64])
bodies = (
    st.binary(max_size=600)
    | st.builds(lambda body: json.dumps(body).encode(), json_event_bodies())
    # Python's json module reads NaN and Infinity, which no other JSON reader does: they must not break a turn.
    | st.builds(
        lambda body, field, number: json.dumps({**body, field: number}).encode(),
        json_event_bodies(),
        st.sampled_from(["duration", "latency", "recording_duration", "data", "custom_metadata", "text"]),
        special_numbers | st.dictionaries(st.just("n"), special_numbers, min_size=1),
    )
    # A lone surrogate (`\ud800`) somewhere: valid JSON, but text no store, log or reply stream can encode.
    | st.builds(lambda body: json.dumps(body).encode(), bodies_with_a_lone_surrogate())
)


@st.composite
def unsigned_requests(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """A body and a signature header that does not prove it: absent, any bytes, almost valid, or genuinely signed
    but over another body, with another secret, or outside the tolerance."""
    body = draw(bodies)
    other_body = draw(st.binary(max_size=40).filter(lambda other: other != body))
    now = int(time.time())
    header = draw(
        st.none()
        | st.binary(max_size=120)
        | st.text(st.characters(max_codepoint=255), max_size=80).map(lambda text: text.encode("latin-1"))
        | almost_valid_headers().map(lambda text: text.encode("utf-8"))
        | genuine_headers(other_body, secret=SECRET, now=now).map(str.encode)
        | st.builds(lambda secret: sign(body, secret).encode(), st.text(min_size=1, max_size=12))
        | st.sampled_from([now - 301, now + 310, 0]).map(lambda t: sign(body, SECRET, timestamp=t).encode())
    )
    return body, header


def request_headers(signature: bytes | None, content_type: str | None) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    if signature is not None:
        headers.append((SIGNATURE_HEADER.encode(), signature))
    return headers


@HTTP_PROPERTY
@given(sent=unsigned_requests(), content_type=content_types)
async def test_a_request_without_a_valid_signature_is_a_401_and_nothing_happens(
    served: Served, sent: tuple[bytes, bytes | None], content_type: str | None
) -> None:
    body, signature = sent
    before = served.store_state()
    calls = len(served.llm_calls)

    response = await served.post(body, request_headers(signature, content_type))

    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["reason"]
    assert len(served.llm_calls) == calls
    assert served.store_state() == before


@HTTP_PROPERTY
@given(body=bodies, content_type=content_types)
# Each once broke the stream (no event, no `response.end`) or gave a 500, away from the parser.
@example(body=b'{"type":"message","conversation_id":"c","turn_id":"t\\ud800","text":"hi"}', content_type=None)
@example(body=b'{"type":"data","conversation_id":"c\\udc00","data":{}}', content_type="application/json")
@example(body=b'{"type":"session.end","conversation_id":"c\\ud800"}', content_type="application/json")
@example(
    body=b'{"type":"session.end","conversation_id":"c","transcript":[{"role":"user","text":"\\ud83d"}]}',
    content_type="application/json",
)
async def test_a_validly_signed_body_is_answered_as_its_parse_says(
    served: Served, body: bytes, content_type: str | None
) -> None:
    try:
        parse_event(body)
    except PayloadError as exc:
        expected: int = exc.status_code
    else:
        expected = 200
    before = served.store_state()
    calls = len(served.llm_calls)

    response = await served.post(body, request_headers(sign(body, SECRET).encode(), content_type))

    event(f"answered {response.status_code}")  # see --hypothesis-show-statistics
    assert response.status_code == expected, response.text
    if expected == 200:
        # A valid event: answered as test_webhook.py describes, the model and the store may be used; a reply
        # stream always ends with its `response.end`.
        if response.headers["content-type"].startswith("text/event-stream"):
            assert SSEParser().feed(response.content)[-1]["type"] == "response.end"
        return
    assert response.status_code in (400, 422)
    assert response.json()["error"] == "invalid body"
    assert len(served.llm_calls) == calls
    assert served.store_state() == before


async def test_the_model_and_store_checks_can_fail(served: Served) -> None:
    # The checks above see a turn when there is one: otherwise "no model call, no store write" would prove nothing.
    body = json.dumps({"type": "message", "conversation_id": "conv_fuzz", "text": "hi"}).encode()
    empty = served.store_state()
    rejected = await served.post(body[:-1], request_headers(sign(body[:-1], SECRET).encode(), "application/json"))
    assert (rejected.status_code, served.llm_calls, served.store_state()) == (400, [], empty)
    accepted = await served.post(body, request_headers(sign(body, SECRET).encode(), "application/json"))
    assert accepted.status_code == 200
    assert len(served.llm_calls) == 1
    assert served.store_state() != empty


# --- Found by fuzzing: JSON the decoder itself cannot read (it once escaped as a 500) ------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000, id="deeply-nested-array"),
        pytest.param(b"1" * 4301, id="integer-over-4300-digits"),
    ],
)
async def test_a_signed_body_json_cannot_decode_is_a_400(served: Served, body: bytes) -> None:
    # A client that sees the 500 as Layercode would, instead of the app's exception.
    transport = httpx.ASGITransport(app=served.app.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        with anyio.fail_after(ANSWER_WITHIN):
            response = await http.post("/api/agent", content=body, headers={SIGNATURE_HEADER: sign(body, SECRET)})
    assert response.status_code == 400
