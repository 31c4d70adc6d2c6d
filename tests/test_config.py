from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from layercode_agent.config import Settings, resolve_webhook_secrets


def test_comma_separated_secrets_are_all_accepted(tmp_path: Path) -> None:
    secrets = resolve_webhook_secrets(Settings(layercode_webhook_secret=SecretStr("old, new ,"), data_dir=tmp_path))
    assert [value.get_secret_value() for value in secrets.values] == ["old", "new"]
    assert secrets.source == "LAYERCODE_WEBHOOK_SECRET"
    assert "old" not in repr(secrets)
    assert "old" not in str(secrets)


def test_development_secret_is_created_once_privately(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    settings = Settings(data_dir=tmp_path / "data")
    first = resolve_webhook_secrets(settings)
    second = resolve_webhook_secrets(settings)
    path = tmp_path / "data" / "dev-webhook-secret"
    assert first.values == second.values and len(first.values[0].get_secret_value()) > 32
    assert first.source.startswith("development secret generated")
    assert second.source.startswith("development secret in")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_layercode_example_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_GENERATIVE_AI_API_KEY", "g-key")
    monkeypatch.setenv("UVICORN_RELOAD", "true")
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", "9001")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    settings = Settings()
    assert settings.gemini_api_key is not None and settings.gemini_api_key.get_secret_value() == "g-key"
    assert settings.uvicorn_reload is True
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 9001, "debug")


@pytest.mark.parametrize("name", ["GEMINI_API_KEY", "GOOGLE_API_KEY"])
def test_gemini_key_aliases(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "k")
    settings = Settings()
    assert settings.gemini_api_key is not None and settings.gemini_api_key.get_secret_value() == "k"


def test_store_defaults_to_sqlite_in_the_data_folder(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).store_url == f"sqlite:///{tmp_path}/conversations.db"


def test_system_prompt_file(tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Be a pirate.\n")
    assert Settings(system_prompt_file=prompt).resolved_system_prompt() == "Be a pirate."


def test_admin_token_is_secret_and_an_empty_one_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", "adm-123")
    settings = Settings()
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "adm-123"
    assert "adm-123" not in repr(settings)
    monkeypatch.setenv("ADMIN_TOKEN", "")
    assert Settings().admin_token is None
