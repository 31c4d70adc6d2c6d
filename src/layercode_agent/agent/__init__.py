"""The pydantic-ai agent: prompt, tools and model. No HTTP and no Layercode types in here."""

from __future__ import annotations

from typing import Any

from pydantic_ai import Agent
from pydantic_ai.agent import AbstractAgent
from pydantic_ai.models import Model

from ..utils import import_string
from .chat_completions import DIRECT_TEXT, EARLY_REQUEST, ChatCompletionsModel, EarlyRequest
from .cleaning import VoiceTextCleaner, clean_text
from .deps import CallContext
from .models import ModelChoice, ModelKeys, resolve_model
from .prompts import (
    APOLOGY,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_WELCOME_MESSAGE,
    INTERRUPTED_MARK,
    SLOW_FILLER,
    TOOL_FILLER,
)
from .tools import current_time

__all__ = [
    "APOLOGY",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_WELCOME_MESSAGE",
    "DIRECT_TEXT",
    "EARLY_REQUEST",
    "INTERRUPTED_MARK",
    "SLOW_FILLER",
    "TOOL_FILLER",
    "AgentLoadError",
    "CallContext",
    "ChatCompletionsModel",
    "EarlyRequest",
    "ModelChoice",
    "ModelKeys",
    "VoiceTextCleaner",
    "build_agent",
    "clean_text",
    "load_user_agent",
    "resolve_model",
]


class AgentLoadError(ValueError):
    """`AGENT=module:attribute` does not name a pydantic-ai agent."""


def build_agent(
    *, system_prompt: str | None = None, tools: bool = True, model: Model | None = None
) -> Agent[CallContext, str]:
    """The built-in voice agent; the model is usually given per run, so one agent serves any `AGENT_MODEL`."""
    return Agent(
        model,
        deps_type=CallContext,
        output_type=str,
        instructions=system_prompt or DEFAULT_SYSTEM_PROMPT,
        tools=[current_time] if tools else [],
        name="layercode-agent",
    )


def load_user_agent(spec: str) -> AbstractAgent[Any, Any]:
    """Import the user's own agent from `module:attribute` (an `Agent`, or a function returning one)."""
    try:
        value: Any = import_string(spec)
    except ImportError as exc:
        raise AgentLoadError(f"AGENT={spec!r}: {exc}") from exc
    if not isinstance(value, AbstractAgent) and callable(value):
        value = value()
    if not isinstance(value, AbstractAgent):
        raise AgentLoadError(f"AGENT={spec!r} is a {type(value).__name__}, not a pydantic-ai Agent")
    return value  # pyright: ignore[reportUnknownVariableType]
