from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from pydantic_ai import models

from .fakes.layercode_api import FakeLayercodeAPI
from .fakes.openai_server import FakeOpenAI
from .fakes.redis_server import RedisServer

# No test may reach a real LLM provider; tests use pydantic-ai's doubles or the local fakes.
models.ALLOW_MODEL_REQUESTS = False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server on 127.0.0.1 for the whole run; `.url` is `redis://127.0.0.1:<port>/0`.

    Fails (never skips) when redis-server is not installed, saying how to install it.
    """
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL with a key prefix of its own, so no two tests see each other's keys."""
    return f"{redis_server.url}?prefix=test-{uuid.uuid4().hex}:"


@pytest.fixture
def fake_llm() -> Iterator[FakeOpenAI]:
    """A local OpenAI-compatible streaming server, one per test, so each test counts the requests its LLM got.

    Modules whose tests share one (scripted by a responder) override it with a module-scoped fixture.
    """
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def api() -> Iterator[FakeLayercodeAPI]:
    """A local stand-in for Layercode's REST API (`authorize_session`); point `LAYERCODE_API_URL` at `api.url`."""
    with FakeLayercodeAPI() as fake:
        yield fake
