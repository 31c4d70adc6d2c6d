"""Choose the LLM from one setting, `AGENT_MODEL`.

`auto` picks the fastest configured provider for speech (Layercode's latency guide recommends
Gemini Flash Lite and small GPT models without reasoning), falling back to the embedded offline
model so the service works with no keys at all. Any pydantic-ai model name works too, and
`openai-chat:NAME` with `OPENAI_BASE_URL` reaches any OpenAI-compatible server (Ollama, vLLM,
llama.cpp, Groq, OpenRouter) with token-by-token streaming, through the lean client of
`chat_completions.py` unless `OPENAI_CLIENT=sdk` asks for pydantic-ai's `OpenAIChatModel`.
`openai:` names speak the Responses API, which only the SDK model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic_ai.models import Model, infer_model
from pydantic_ai.settings import ModelSettings

__all__ = ["GEMINI_DEFAULT", "LOCAL", "OPENAI_DEFAULT", "ModelChoice", "ModelKeys", "resolve_model"]

LOCAL = "local"
GEMINI_DEFAULT = "google:gemini-2.5-flash-lite"
OPENAI_DEFAULT = "openai:gpt-5-nano"

# Names from pydantic-ai 1.x and from Layercode's examples that pydantic-ai 2 spells differently.
_PROVIDER_ALIASES = {"google-gla": "google", "google-vertex": "google-cloud"}


@dataclass(frozen=True)
class ModelKeys:
    """Credentials and endpoints taken from the settings (kept out of the environment on purpose)."""

    gemini_api_key: str | None = field(default=None, repr=False)
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_client: str = "lean"
    """`lean` (our streaming Chat Completions client) or `sdk` (pydantic-ai's `OpenAIChatModel`)."""
    anthropic_api_key: str | None = field(default=None, repr=False)


@dataclass
class ModelChoice:
    """The model to run, the settings that make it quick to speak, and how to name it in logs."""

    model: Model
    name: str
    settings: ModelSettings = field(default_factory=lambda: ModelSettings())
    is_local: bool = False
    reason: str = ""


def resolve_model(spec: str, keys: ModelKeys) -> ModelChoice:
    """Turn `AGENT_MODEL` into a model instance.

    Raises:
        pydantic_ai.exceptions.UserError: the name is unknown or its provider has no key; bad
            configuration fails at start-up, not on the first call.
    """
    spec = spec.strip()
    if spec in ("", "auto"):
        if keys.gemini_api_key:
            return _build(GEMINI_DEFAULT, keys, reason="auto: a Gemini API key is set")
        if keys.openai_api_key:
            return _build(OPENAI_DEFAULT, keys, reason="auto: an OpenAI API key is set")
        return _local("auto: no LLM API key is set")
    if spec == LOCAL:
        return _local("AGENT_MODEL=local")
    return _build(spec, keys, reason="AGENT_MODEL")


def _local(reason: str) -> ModelChoice:
    from .local import LocalModel

    return ModelChoice(
        model=LocalModel(),
        name="local:smollm2-135m-instruct (tiny offline demo model: fluent but often wrong)",
        settings=ModelSettings(max_tokens=120, temperature=0.3),
        is_local=True,
        reason=reason,
    )


def _build(spec: str, keys: ModelKeys, *, reason: str) -> ModelChoice:
    provider, _, name = spec.partition(":")
    provider = _PROVIDER_ALIASES.get(provider, provider)
    spec = f"{provider}:{name}" if name else provider
    settings = ModelSettings()
    model: Model
    if provider == "google":
        from pydantic_ai.models.google import GoogleModel, GoogleModelSettings
        from pydantic_ai.providers.google import GoogleProvider

        model = GoogleModel(name, provider=GoogleProvider(api_key=keys.gemini_api_key))
        # Thinking adds seconds of silence before the first word; Flash models run fine without it.
        settings = GoogleModelSettings(google_thinking_config={"thinking_budget": 0}) if "flash" in name else settings
    elif provider == "openai-chat" and keys.openai_client != "sdk":
        from .chat_completions import ChatCompletionsModel

        model = ChatCompletionsModel(name, base_url=keys.openai_base_url, api_key=keys.openai_api_key)
    elif provider in ("openai", "openai-chat", "openai-responses"):
        from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel, OpenAIResponsesModelSettings
        from pydantic_ai.providers.openai import OpenAIProvider

        openai = OpenAIProvider(base_url=keys.openai_base_url, api_key=keys.openai_api_key)
        if provider == "openai-chat":
            model = OpenAIChatModel(name, provider=openai)
        else:
            model = OpenAIResponsesModel(name, provider=openai)
            if name.startswith("gpt-5"):
                settings = OpenAIResponsesModelSettings(openai_reasoning_effort="minimal", openai_text_verbosity="low")
    elif provider == "anthropic" and keys.anthropic_api_key:
        from pydantic_ai.models.anthropic import AnthropicModel
        from pydantic_ai.providers.anthropic import AnthropicProvider

        model = AnthropicModel(name, provider=AnthropicProvider(api_key=keys.anthropic_api_key))
    else:
        model = infer_model(spec)
    return ModelChoice(model=model, name=spec, settings=settings, reason=reason)
