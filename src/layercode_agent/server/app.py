"""The composition root: settings in, a ready FastAPI app out.

`create_app(settings)` wires the store, the agent and the model once per process. Uvicorn runs
`create_app_from_env` in factory mode, so every worker of `serve --workers N` builds its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic_ai.agent import AbstractAgent

from ..agent import (
    DEFAULT_WELCOME_MESSAGE,
    ModelChoice,
    ModelKeys,
    build_agent,
    load_user_agent,
    resolve_model,
)
from ..config import MAX_BODY_BYTES, Settings, get_settings, resolve_webhook_secrets
from ..stores import open_store
from ..telemetry import configure_logfire
from ..turns import DataHandler, TurnRunner, default_data_handler
from ..utils import import_string
from .errors import install_error_handlers
from .routes import authorize, conversations, health, playground, webhook
from .runtime import Runtime

__all__ = ["Runtime", "create_app", "create_app_from_env", "model_choice"]

logger = logging.getLogger("layercode_agent")


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def model_choice(settings: Settings) -> ModelChoice:
    """Resolve `AGENT_MODEL` with the keys from the settings (no network, no weights loaded)."""
    keys = ModelKeys(
        gemini_api_key=_secret(settings.gemini_api_key),
        openai_api_key=_secret(settings.openai_api_key),
        openai_base_url=settings.openai_base_url,
        anthropic_api_key=_secret(settings.anthropic_api_key),
    )
    return resolve_model(settings.agent_model, keys)


def _agent_and_model(
    settings: Settings, agent: AbstractAgent[Any, Any] | None
) -> tuple[AbstractAgent[Any, Any], ModelChoice | None]:
    if agent is None and settings.agent:
        agent = load_user_agent(settings.agent)
    if agent is None:
        return build_agent(system_prompt=settings.resolved_system_prompt()), model_choice(settings)
    # A user's agent keeps its own model unless AGENT_MODEL names one explicitly.
    if agent.model is not None and settings.agent_model in ("", "auto"):
        return agent, None
    return agent, model_choice(settings)


def create_app(
    settings: Settings,
    *,
    agent: AbstractAgent[Any, Any] | None = None,
    data_handler: DataHandler | None = None,
) -> FastAPI:
    """Build the app; bad configuration raises here, at start-up, not on the first call."""
    secrets = resolve_webhook_secrets(settings)
    agent, choice = _agent_and_model(settings, agent)
    handler: DataHandler = data_handler or default_data_handler
    if data_handler is None and settings.data_handler:
        handler = import_string(settings.data_handler)
    welcome = DEFAULT_WELCOME_MESSAGE if settings.welcome_message is None else settings.welcome_message
    model_name = choice.name if choice is not None else f"{agent.model} (from AGENT={settings.agent})"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
        configure_logfire(_secret(settings.logfire_token))
        store = open_store(settings.store_url)
        if choice is not None and choice.is_local:
            from ..agent.local import load_engine

            # Load the weights once per process now, so the first caller does not wait for them.
            await asyncio.to_thread(load_engine)
        runner = TurnRunner(
            agent=agent,
            store=store,
            model=choice.model if choice is not None else None,
            model_settings=choice.settings if choice is not None else None,
            welcome_message=welcome,
            llm_timeout=settings.llm_timeout,
            filler_after_ms=settings.filler_after_ms,
            slow_filler=settings.filler_text,
            data_handler=handler,
        )
        async with httpx.AsyncClient() as http:
            app.state.runtime = Runtime(
                settings=settings,
                secrets=secrets.values,
                secret_source=secrets.source,
                runner=runner,
                store=store,
                http=http,
                model_name=model_name,
                store_description=store.description,
            )
            try:
                yield
            finally:
                await runner.aclose()
                await store.aclose()

    app = FastAPI(
        title="layercode-agent",
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    app.include_router(webhook.router)
    app.include_router(authorize.router)
    app.include_router(health.router)
    if settings.admin_token is not None:
        # Without a token there is no admin API at all (404), rather than one nobody can open.
        app.include_router(conversations.router)
    if settings.playground:
        # The playground signs webhooks with the server's secret: never on an interface others can reach.
        if (refusal := playground.playground_refusal(settings.host)) is None:
            app.include_router(playground.router)
        else:
            logger.warning("PLAYGROUND is on but not mounted: %s", refusal)
    return app


def create_app_from_env() -> FastAPI:
    """Uvicorn factory: read the environment and `.env`, then build the app."""
    return create_app(get_settings())
