from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from layercode_agent import __version__
from layercode_agent.cli import main
from layercode_agent.protocol import SignatureError, verify


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"layercode-agent {__version__}"


def test_sign_prints_a_header_the_server_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    body = '{"type":"message","conversation_id":"c","text":"hi"}'
    assert main(["sign", body, "--secret", "s3", "--timestamp", "1700000000"]) == 0
    header = capsys.readouterr().out.strip()
    assert header.startswith("t=1700000000,v1=")
    assert verify(body.encode(), header, ["s3"], now=1700000000) == 1700000000


def test_sign_uses_the_development_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    (tmp_path / "dev-webhook-secret").write_text("dev_abc\n")
    (tmp_path / "dev-webhook-secret").chmod(0o600)  # As the server creates it; any other mode is refused.
    body_file = tmp_path / "body.json"
    body_file.write_bytes(b'{"a":1}')
    assert main(["sign", "--file", str(body_file)]) == 0
    header = capsys.readouterr().out.strip()
    assert verify(b'{"a":1}', header, ["dev_abc"]) > 0


def test_sign_without_any_secret_explains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "empty"))
    assert main(["sign", "{}"]) == 2
    assert "No webhook secret" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


def test_serve_refuses_memory_store_with_several_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CONVERSATION_STORE", "memory://")
    monkeypatch.setenv("AGENT_MODEL", "test")
    assert main(["serve", "--workers", "2"]) == 2
    assert "memory://" in capsys.readouterr().err


def test_serve_reports_an_unknown_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AGENT_MODEL", "nonsense:model-x")
    assert main(["serve"]) == 2
    assert "Cannot start" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["sign", "{}", "--timestamp", "soon"], "Invalid value for '--timestamp'"),
        (["chat", "--bogus"], "No such option: --bogus"),
        (["simulate", "a.yaml", "--concurrency", "x"], "Invalid value for '--concurrency'"),
        (["no-such-command"], "No such command"),
    ],
)
def test_a_usage_error_exits_2_with_the_reason_and_no_traceback(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert reason in " ".join(err.replace("│", " ").split())
    assert "Traceback" not in err


# --- Where the signing secret comes from ---------------------------------------------------------------

BODY = '{"type":"message","conversation_id":"c","text":"hi"}'


@pytest.fixture
def no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without .env, no LAYERCODE_WEBHOOK_SECRET and no development secret."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def stdin_of(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))


def signed_with(capsys: pytest.CaptureFixture[str], secret: str) -> bool:
    header = capsys.readouterr().out.strip()
    try:
        return verify(BODY.encode(), header, [secret]) > 0
    except SignatureError:
        return False


def test_sign_reads_the_secret_from_a_file(no_secret: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (no_secret / "secret").write_text("whsec_from_file\n")
    assert main(["sign", BODY, "--secret-file", "secret"]) == 0
    assert signed_with(capsys, "whsec_from_file")


@pytest.mark.parametrize("option", [["--secret-file", "-"], ["--secret", "-"]])
def test_sign_reads_the_secret_from_standard_input(
    no_secret: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    stdin_of(monkeypatch, "whsec_from_stdin\n")
    assert main(["sign", BODY, *option]) == 0
    assert signed_with(capsys, "whsec_from_stdin")


def test_sign_reads_the_secret_from_the_environment_or_dotenv(
    no_secret: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (no_secret / ".env").write_text("LAYERCODE_WEBHOOK_SECRET=whsec_from_dotenv\n")
    assert main(["sign", BODY]) == 0
    assert signed_with(capsys, "whsec_from_dotenv")
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", "whsec_from_env")
    assert main(["sign", BODY]) == 0
    assert signed_with(capsys, "whsec_from_env")
    # An option wins over the settings.
    (no_secret / "secret").write_text("whsec_from_file")
    assert main(["sign", BODY, "--secret-file", "secret"]) == 0
    assert signed_with(capsys, "whsec_from_file")


@pytest.mark.parametrize(
    ("argv", "stdin", "reason"),
    [
        (["--secret", "s", "--secret-file", "secret"], "", "pass --secret or --secret-file, not both"),
        (["--secret-file", "missing"], "", "cannot read missing"),
        (["--secret-file", "empty"], "", "empty holds no secret"),
        (["--secret-file", "two-lines"], "", "two-lines holds more than one line"),
        (["--secret", "-"], "", "standard input holds no secret"),
        (["--secret", "-", "-"], "s\n{}", "the body cannot come from standard input too"),
    ],
)
def test_sign_refuses_an_unusable_secret_option(
    no_secret: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    stdin: str,
    reason: str,
) -> None:
    (no_secret / "secret").write_text("s")
    (no_secret / "empty").write_text("\n")
    (no_secret / "two-lines").write_text("a\nb\n")
    stdin_of(monkeypatch, stdin)
    body = [] if "-" in argv[2:] else [BODY]
    assert main(["sign", *body, *argv]) == 2
    captured = capsys.readouterr()
    assert reason in " ".join(captured.err.replace("│", " ").split()), captured.err
    assert captured.out == "" and "Traceback" not in captured.err


@pytest.mark.parametrize("command", ["sign", "chat", "simulate"])
def test_help_says_how_to_keep_the_secret_off_the_command_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.replace("│", " ").split())
    for fragment in ["--secret-file", "standard input", "ps", "LAYERCODE_WEBHOOK_SECRET", ".env"]:
        assert fragment in shown, (fragment, shown)
