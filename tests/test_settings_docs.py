"""The settings as documented: `.env.example` loads as it is, every setting is in it and in README's table,
and the security settings parse the way the docs say."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from layercode_agent.config import RateLimit, Settings

REPO = Path(__file__).resolve().parents[1]


def _names(settings_field: str) -> set[str]:
    field = Settings.model_fields[settings_field]
    alias = field.validation_alias
    choices = getattr(alias, "choices", None)
    return {str(choice) for choice in choices} if choices else {settings_field.upper()}


def test_env_example_loads_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    monkeypatch.chdir(tmp_path)
    for name in list(Settings.model_fields) + ["GOOGLE_GENERATIVE_AI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"]:
        monkeypatch.delenv(name.upper(), raising=False)
    settings = Settings()
    assert settings.authorize_token is None and settings.authorize_hook is None
    assert settings.rate_limit == RateLimit(10, 60.0)
    assert settings.cors_allow_origins == [] and settings.cors_allow_credentials is False
    assert settings.filler_after_ms is None


@pytest.mark.parametrize("document", ["README.md", ".env.example"])
def test_every_setting_is_documented(document: str) -> None:
    text = (REPO / document).read_text()
    missing = [
        field
        for field in Settings.model_fields
        if not any(re.search(rf"\b{re.escape(name)}\b", text) for name in _names(field))
    ]
    assert missing == [], f"{document} does not mention {missing}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10/minute", RateLimit(10, 60.0)),
        (" 3/Seconds ", RateLimit(3, 1.0)),
        ("100/hour", RateLimit(100, 3600.0)),
        ("5/day", RateLimit(5, 86400.0)),
        ("off", None),
    ],
)
def test_rate_limits_parse(text: str, expected: RateLimit | None) -> None:
    assert RateLimit.parse(text) == expected
    if expected is not None:
        assert RateLimit.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "10", "0/minute", "-1/minute", "ten/minute", "5/week", "5/"])
def test_bad_rate_limits_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="N/minute"):
        RateLimit.parse(text)


def test_cors_origins_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "https://app.example.com/, ,https://b.example.com")
    assert Settings(_env_file=None).cors_allow_origins == ["https://app.example.com", "https://b.example.com"]  # pyright: ignore[reportCallIssue]


def test_wildcard_origin_with_credentials_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "*")
    monkeypatch.setenv("CORS_ALLOW_CREDENTIALS", "true")
    with pytest.raises(ValidationError, match="list the origins"):
        Settings(_env_file=None)  # pyright: ignore[reportCallIssue]
    monkeypatch.setenv("CORS_ALLOW_CREDENTIALS", "false")
    assert Settings(_env_file=None).cors_allow_origins == ["*"]  # pyright: ignore[reportCallIssue]
