from __future__ import annotations

from pathlib import Path

import pytest

from layercode_agent import __version__
from layercode_agent.cli import main
from layercode_agent.protocol import verify


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
