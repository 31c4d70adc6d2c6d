"""The composition root: settings in, a ready FastAPI app out.

`create_app(settings)` wires the store, the agent and the model once per process. Uvicorn runs
`create_app_from_env` in factory mode, so every worker of `serve --workers N` builds its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY
from pydantic_ai.agent import AbstractAgent
from pydantic_ai.usage import UsageLimits

from ..agent import (
    DEFAULT_WELCOME_MESSAGE,
    ChatCompletionsModel,
    ModelChoice,
    ModelKeys,
    build_agent,
    load_user_agent,
    resolve_model,
)
from ..config import Settings, get_settings, resolve_webhook_secrets
from ..observability import MetricsObserver, forget_process
from ..stores import open_store
from ..telemetry import Tracing, configure_tracing
from ..turns import DataHandler, TurnObserver, TurnRunner, default_data_handler
from ..utils import import_string
from .access import AuthorizeHook, Gate
from .cors import AuthorizeCORS
from .errors import install_error_handlers
from .heap import settled_heap
from .http import GuardedHttpToolsProtocol
from .routes import authorize, conversations, health, playground, webhook
from .routes.metrics import metrics_router
from .runtime import Runtime
from .shutdown import DrainingMiddleware, GracefulShutdown

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
        openai_client=settings.openai_client,
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


def _tracing(settings: Settings) -> Tracing | None:
    return configure_tracing(
        logfire_token=settings.logfire_token,
        otlp_endpoint=settings.otel_exporter_otlp_endpoint,
        otlp_traces_endpoint=settings.otel_exporter_otlp_traces_endpoint,
        otlp_headers=settings.otel_exporter_otlp_headers,
        service_name=settings.otel_service_name,
    )


def _observer(settings: Settings, tracing: Tracing | None) -> TurnObserver:
    if not settings.metrics and tracing is None:
        return TurnObserver()  # Nothing to record: not even the hooks do any work.
    return MetricsObserver(
        registry=REGISTRY if settings.metrics else None, tracer=tracing.tracer if tracing is not None else None
    )


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
    hook: AuthorizeHook | None = import_string(settings.authorize_hook) if settings.authorize_hook else None
    if hook is not None and not callable(hook):
        raise TypeError(f"AUTHORIZE_HOOK={settings.authorize_hook!r} is not a function")
    # Read by uvicorn's protocol on each connection of this process (when served by `serve`).
    GuardedHttpToolsProtocol.configure(
        max_head_bytes=settings.max_header_bytes, read_timeout=settings.request_read_timeout
    )
    # Set by `serve --workers N` (or by the user) before any worker imported prometheus_client.
    multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
        tracing = _tracing(settings)
        if tracing is not None:
            logger.info("sending turn spans to %s", tracing.destination)
        store = open_store(settings.store_url, timeout=settings.store_timeout)
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
            observer=_observer(settings, tracing),
            usage_limits=UsageLimits(
                request_limit=settings.llm_request_limit, total_tokens_limit=settings.llm_token_limit
            ),
            close_retry_for=settings.store_retry_seconds,
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
            app.state.runtime.gate = Gate(
                store=store, token=settings.authorize_token, hook=hook, rate_limit=settings.rate_limit
            )
            # SIGTERM drains this worker's reply streams before uvicorn shuts down (server/shutdown.py).
            shutdown = GracefulShutdown(app.state.runtime, drain_seconds=settings.shutdown_drain_seconds)
            shutdown.install()
            try:
                with settled_heap():  # Start-up is over: what it built is never walked by the collector again.
                    yield
            finally:
                await shutdown.aclose()
                await runner.aclose()
                await store.aclose()
                if choice is not None and isinstance(choice.model, ChatCompletionsModel):
                    await choice.model.aclose()  # Its keep-alive connections to the LLM.
                if multiprocess_dir is not None and settings.metrics:
                    forget_process(multiprocess_dir, os.getpid())  # This worker streams nothing any more.
                if tracing is not None:
                    await asyncio.to_thread(tracing.shutdown)

    app = FastAPI(
        title="layercode-agent",
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    # Added before CORS, so a browser's refused call still carries its CORS headers.
    app.add_middleware(DrainingMiddleware)
    if settings.cors_allow_origins:
        app.add_middleware(
            AuthorizeCORS, origins=settings.cors_allow_origins, credentials=settings.cors_allow_credentials
        )
    app.include_router(webhook.router)
    app.include_router(authorize.router)
    app.include_router(health.router)
    if settings.metrics:
        app.include_router(metrics_router(multiprocess_dir))
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
