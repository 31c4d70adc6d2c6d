from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo, DeltaToolCalls, FunctionModel

from layercode_agent.agent import build_agent
from layercode_agent.client import WebhookClient
from layercode_agent.config import Settings
from layercode_agent.server import Runtime, create_app

SECRET = "whsec_test_secret"

StreamFn = Callable[[list[ModelMessage], AgentInfo], AsyncIterator[str | DeltaToolCalls]]


async def words(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    for word in ["Hello", " there", ", friend."]:
        yield word


class App:
    def __init__(self, app: FastAPI, http: httpx.AsyncClient) -> None:
        self.app = app
        self.http = http

    @property
    def runtime(self) -> Runtime:
        return self.app.state.runtime

    def client(self, **kwargs: Any) -> WebhookClient:
        return WebhookClient("http://test/api/agent", SECRET, http=self.http, **kwargs)


AppFactory = Callable[..., AbstractAsyncContextManager[App]]


@pytest.fixture
def settings_values(tmp_path: Path) -> dict[str, Any]:
    return {
        "layercode_webhook_secret": SECRET,
        "conversation_store": "memory://",
        "data_dir": tmp_path,
        "welcome_message": "Welcome aboard.",
    }


@pytest.fixture
def make_app(settings_values: dict[str, Any]) -> AppFactory:
    @asynccontextmanager
    async def factory(stream: StreamFn = words, **overrides: Any) -> AsyncGenerator[App]:
        agent = build_agent(model=FunctionModel(stream_function=stream))
        app = create_app(Settings(**{**settings_values, **overrides}), agent=agent)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                yield App(app, http)

    return factory
