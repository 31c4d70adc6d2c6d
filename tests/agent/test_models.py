from __future__ import annotations

import pytest
from pydantic_ai.exceptions import UserError
from pydantic_ai.models.google import GoogleModel
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel

from layercode_agent.agent import ChatCompletionsModel, ModelKeys, resolve_model
from layercode_agent.agent.local import LocalModel


def test_auto_without_keys_is_the_embedded_model() -> None:
    choice = resolve_model("auto", ModelKeys())
    assert isinstance(choice.model, LocalModel)
    assert choice.is_local and "offline demo" in choice.name


def test_auto_prefers_gemini_flash_lite_without_thinking() -> None:
    choice = resolve_model("auto", ModelKeys(gemini_api_key="g", openai_api_key="o"))
    assert isinstance(choice.model, GoogleModel)
    assert choice.model.model_name == "gemini-2.5-flash-lite"
    assert choice.settings.get("google_thinking_config") == {"thinking_budget": 0}


def test_auto_with_openai_key_is_gpt5_nano_minimal_reasoning() -> None:
    choice = resolve_model("auto", ModelKeys(openai_api_key="o"))
    assert isinstance(choice.model, OpenAIResponsesModel)
    assert choice.model.model_name == "gpt-5-nano"
    assert choice.settings.get("openai_reasoning_effort") == "minimal"
    assert choice.settings.get("openai_text_verbosity") == "low"


def test_openai_compatible_server_uses_the_lean_client() -> None:
    choice = resolve_model("openai-chat:llama3", ModelKeys(openai_base_url="http://127.0.0.1:11434/v1"))
    assert isinstance(choice.model, ChatCompletionsModel)
    assert choice.model.model_name == "llama3"
    assert choice.model.base_url == "http://127.0.0.1:11434/v1"


def test_openai_client_sdk_selects_pydantic_ais_chat_model() -> None:
    keys = ModelKeys(openai_base_url="http://127.0.0.1:11434/v1", openai_client="sdk")
    choice = resolve_model("openai-chat:llama3", keys)
    assert isinstance(choice.model, OpenAIChatModel)
    assert choice.model.base_url.startswith("http://127.0.0.1:11434/v1")


def test_openai_names_keep_the_responses_api() -> None:
    choice = resolve_model("openai:gpt-5-nano", ModelKeys(openai_api_key="o"))
    assert isinstance(choice.model, OpenAIResponsesModel)


def test_legacy_google_gla_prefix_is_accepted() -> None:
    choice = resolve_model("google-gla:gemini-2.5-flash-lite", ModelKeys(gemini_api_key="g"))
    assert isinstance(choice.model, GoogleModel)


def test_missing_key_fails_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(UserError, match="ANTHROPIC_API_KEY"):
        resolve_model("anthropic:claude-haiku-4-5", ModelKeys())
