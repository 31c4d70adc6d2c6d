"""What the real server writes to disk only its own user can read: the data folder, the database and its journals,
the development secret."""

from __future__ import annotations

import os
import stat
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import pytest

from layercode_agent.cli import main
from layercode_agent.client import WebhookClient

from ..fakes.openai_server import FakeOpenAI
from ..fakes.server_process import ServerProcess, server_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@contextmanager
def umask(value: int) -> Generator[None]:
    """The server inherits this umask: 022, the common default that leaves new files readable by everyone."""
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(os.lstat(path).st_mode))


@pytest.mark.parametrize("secret", ["configured", "development"])
async def test_the_data_folder_database_journals_and_secret_are_private(
    tmp_path: Path, fake_llm: FakeOpenAI, secret: str
) -> None:
    data = tmp_path / "data"
    env = server_env(fake_llm, data, secret="whsec_private", welcome="")
    if secret == "development":
        env["LAYERCODE_WEBHOOK_SECRET"] = ""  # Unset: the server creates the development secret in DATA_DIR.
    with umask(0o022):
        server = ServerProcess(env, cwd=tmp_path).start()
    try:
        key = (data / "dev-webhook-secret").read_text().strip() if secret == "development" else "whsec_private"
        async with WebhookClient(server.url, key) as client:
            answer = await client.say("Write something down.")
        assert answer.text == "Hello there, how can I help?"
        # While the server runs the WAL journal and its index exist too.
        database = data / "conversations.db"
        files = [database, data / "conversations.db-wal", data / "conversations.db-shm"]
        if secret == "development":
            files.append(data / "dev-webhook-secret")
        assert {file.name: mode(file) for file in files} == {file.name: "0o600" for file in files}
        assert mode(data) == "0o700"
    finally:
        server.stop()
    assert {path.name: mode(path) for path in data.iterdir() if path.is_file()} == {
        path.name: "0o600" for path in data.iterdir() if path.is_file()
    }


@pytest.mark.parametrize("problem", ["readable by others", "a symbolic link"])
def test_serve_refuses_a_development_secret_it_cannot_trust(tmp_path: Path, problem: str) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    secret = "dev_planted_0123456789abcdef"
    target = data / "dev-webhook-secret" if problem == "readable by others" else tmp_path / "elsewhere"
    target.write_text(secret + "\n")
    target.chmod(0o644 if problem == "readable by others" else 0o600)
    if problem == "a symbolic link":
        (data / "dev-webhook-secret").symlink_to(target)
    env = {"DATA_DIR": str(data), "AGENT_MODEL": "test", "LAYERCODE_WEBHOOK_SECRET": "", "COLUMNS": "200"}
    server = ServerProcess(env, cwd=tmp_path)
    try:
        with pytest.raises(RuntimeError, match="Cannot start"):
            server.start()
    finally:
        server.stop()  # Had it started, it must not outlive the test.
    output = server.log
    assert server.process is not None and server.process.returncode == 2, output
    assert "dev-webhook-secret" in output, output
    assert "Traceback" not in output and secret not in output


def test_sign_refuses_a_development_secret_others_can_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "dev-webhook-secret"
    path.write_text("dev_readable_by_all\n")
    path.chmod(0o644)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("DATA_DIR", raising=False)

    assert main(["sign", "{}"]) == 2
    output = capsys.readouterr()
    assert "Cannot start" in output.err and "chmod 600" in output.err
    assert "dev_readable_by_all" not in output.out + output.err and "Traceback" not in output.err
