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


# --- The development secret: created privately, and only ever read from a file that is ours alone ----------


def dev_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    return Settings(data_dir=tmp_path / "data")


def test_the_data_folder_it_creates_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = os.umask(0o022)
    try:
        resolve_webhook_secrets(dev_settings(tmp_path, monkeypatch))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o700


@pytest.mark.parametrize("planted", ["file", "symlink"])
def test_a_file_planted_where_the_secret_is_written_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """Someone who can write the data folder plants the temporary file: a world-readable one, or a link out."""
    settings = dev_settings(tmp_path, monkeypatch)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    outside = tmp_path / "attacker-reads-this"
    outside.touch()
    outside.chmod(0o666)
    temporary = data / f".dev-webhook-secret.{os.getpid()}"
    if planted == "file":
        temporary.touch()
        temporary.chmod(0o666)
    else:
        temporary.symlink_to(outside)

    secrets = resolve_webhook_secrets(settings)

    value = secrets.values[0].get_secret_value()
    assert outside.read_text() == ""
    path = data / "dev-webhook-secret"
    assert not path.is_symlink() and path.read_text().strip() == value
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    if planted == "file":
        assert temporary.read_text() == ""


def refused(settings: Settings) -> str:
    with pytest.raises(ValueError) as raised:
        resolve_webhook_secrets(settings)
    return str(raised.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644], ids=oct)
def test_a_secret_file_others_can_read_or_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    settings = dev_settings(tmp_path, monkeypatch)
    value = resolve_webhook_secrets(settings).values[0].get_secret_value()
    path = tmp_path / "data" / "dev-webhook-secret"
    path.chmod(mode)

    message = refused(settings)
    assert str(path) in message and "chmod 600" in message and oct(mode)[2:] in message
    assert value not in message
    assert refused(settings.model_copy()) == message  # Refused again, never rewritten or loosened.
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_a_secret_file_owned_by_someone_else_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dev_settings(tmp_path, monkeypatch)
    value = resolve_webhook_secrets(settings).values[0].get_secret_value()
    owner = os.stat(tmp_path / "data" / "dev-webhook-secret").st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # This process now runs as another user.

    message = refused(settings)
    assert "not owned by" in message and value not in message


def test_a_secret_file_that_is_a_symlink_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dev_settings(tmp_path, monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("dev_planted_secret\n")
    elsewhere.chmod(0o600)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dev-webhook-secret").symlink_to(elsewhere)

    message = refused(settings)
    assert "symbolic link" in message and "dev_planted_secret" not in message
    with pytest.raises(ValueError, match="symbolic link"):
        resolve_webhook_secrets(settings, create=False)


def test_an_empty_secret_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dev_settings(tmp_path, monkeypatch)
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "dev-webhook-secret"
    path.touch()
    path.chmod(0o600)

    assert "is empty" in refused(settings)
