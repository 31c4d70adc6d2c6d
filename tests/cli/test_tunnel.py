"""`layercode-agent tunnel`: a stand-in `npx` first on PATH records how Layercode's CLI would have been called."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from layercode_agent.cli import main
from layercode_agent.cli import tunnel as tunnel_cli

from ..fakes.net import free_port

FAKE_NPX = """#!{python}
# Stands in for `npx`: records its arguments, prints a line, then exits with FAKE_NPX_EXIT,
# or with FAKE_NPX_WAIT set runs until interrupted (like the real tunnel) and records that:
# RECORD.ready (holding its PID) once a SIGINT would be caught, RECORD.stopped when one was.
import json, os, sys, time
record = os.environ["FAKE_NPX_RECORD"]
with open(record, "w") as file:
    json.dump(sys.argv[1:], file)
print("fake layercode tunnel running", flush=True)
if os.environ.get("FAKE_NPX_WAIT"):
    try:
        with open(record + ".ready.tmp", "w") as file:
            file.write(str(os.getpid()))
        os.replace(record + ".ready.tmp", record + ".ready")
        time.sleep(120)
    except KeyboardInterrupt:
        with open(record + ".stopped", "w") as file:
            file.write("SIGINT")
        sys.exit(0)
sys.exit(int(os.environ.get("FAKE_NPX_EXIT", "0")))
"""
DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)
"""Runs its arguments with SIGINT at its default, as in a terminal's foreground: a job started in the
background by a shell without job control (`make test &` in a script) inherits SIGINT ignored, and a
Python started that way never raises KeyboardInterrupt."""
DEADLINE = 120.0
"""Seconds any one wait of these tests may take on a busy machine before it counts as a hang."""


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/health"
        body = b'{"status":"ok"}' if ok else b"{}"
        self.send_response(200 if ok else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_port() -> Iterator[int]:
    """A tiny server on 127.0.0.1 answering `GET /health` as the agent does."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the stand-in `npx` first on PATH; returns the file it records its arguments in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npx = bin_dir / "npx"
    npx.write_text(FAKE_NPX.format(python=sys.executable))
    npx.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    path = tmp_path / "npx-args.json"
    monkeypatch.setenv("FAKE_NPX_RECORD", str(path))
    # No .env from the repository, no agent id or secret from the developer's shell.
    monkeypatch.chdir(tmp_path)
    for name in ("LAYERCODE_AGENT_ID", "LAYERCODE_WEBHOOK_SECRET", "PORT", "FAKE_NPX_EXIT", "FAKE_NPX_WAIT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    return path


def recorded(path: Path) -> list[str]:
    return json.loads(path.read_text())


def test_runs_the_layercode_cli_tunnel(
    record: Path, health_port: int, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", "whsec_dashboard")
    assert main(["tunnel", "--agent-id", "ag_123", "--port", str(health_port)]) == 0
    assert recorded(record) == [
        *("@layercode/cli", "tunnel"),
        *("--agent-id", "ag_123", "--port", str(health_port), "--path", "/api/agent"),
    ]
    captured = capfd.readouterr()
    assert "fake layercode tunnel running" in captured.out, "the child's output goes straight to the terminal"
    assert f"Running: npx @layercode/cli tunnel --agent-id ag_123 --port {health_port}" in captured.err
    assert "LAYERCODE_WEBHOOK_SECRET is not set" not in captured.err


def test_agent_id_and_port_from_the_environment(
    record: Path, health_port: int, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAYERCODE_AGENT_ID", "ag_env")
    monkeypatch.setenv("PORT", str(health_port))
    assert main(["tunnel", "--path", "/voice"]) == 0
    assert recorded(record) == [
        *("@layercode/cli", "tunnel"),
        *("--agent-id", "ag_env", "--port", str(health_port), "--path", "/voice"),
    ]
    # Without the dashboard's secret the server would answer Layercode with 401: say so before starting.
    assert "LAYERCODE_WEBHOOK_SECRET is not set" in capfd.readouterr().err


@pytest.mark.parametrize("code", [1, 3])
def test_the_child_exit_code_is_forwarded(
    record: Path, health_port: int, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    monkeypatch.setenv("FAKE_NPX_EXIT", str(code))
    assert main(["tunnel", "--agent-id", "ag_1", "--port", str(health_port)]) == code
    assert record.exists()


def test_without_npx_it_says_to_install_node(
    record: Path, health_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert main(["tunnel", "--agent-id", "ag_1", "--port", str(health_port)]) == 2
    err = capfd.readouterr().err
    assert "npx was not found on PATH" in err and "install Node.js" in err
    assert not record.exists()


def test_without_an_agent_id_it_says_where_to_set_it(
    record: Path, health_port: int, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["tunnel", "--port", str(health_port)]) == 2
    err = capfd.readouterr().err
    assert "No agent id" in err and "--agent-id" in err and "LAYERCODE_AGENT_ID" in err
    assert not record.exists()


def test_without_a_server_it_says_to_start_one(record: Path, capfd: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["tunnel", "--agent-id", "ag_1", "--port", str(port)]) == 2
    err = capfd.readouterr().err
    assert f"No server answers http://127.0.0.1:{port}/health" in err and "make run" in err
    assert "Traceback" not in err
    assert not record.exists()


def test_a_path_must_start_with_a_slash(record: Path, health_port: int, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["tunnel", "--agent-id", "ag_1", "--port", str(health_port), "--path", "api/agent"]) == 2
    assert "--path must start with '/'" in capfd.readouterr().err
    assert not record.exists()


def test_ctrl_c_stops_the_tunnel_cleanly(record: Path, health_port: int, tmp_path: Path) -> None:
    env = {**os.environ, "FAKE_NPX_WAIT": "1"}
    ready = Path(f"{record}.ready")
    cli = [sys.executable, "-m", "layercode_agent", "tunnel", "--agent-id", "ag_1", "--port", str(health_port)]
    process = subprocess.Popen(
        [sys.executable, "-c", DEFAULT_SIGINT, *cli],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stopped = False
    try:
        deadline = time.monotonic() + DEADLINE
        while not ready.exists():  # The stand-in will catch a SIGINT from here on.
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the tunnel never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # only to our process, as a test can (a terminal signals both)
        out, err = process.communicate(timeout=DEADLINE)
        stopped = True
    finally:
        _reap(process, child=None if stopped or not ready.exists() else int(ready.read_text()))
    assert process.returncode == 130, err
    assert "Tunnel stopped." in err and "Traceback" not in err
    assert "fake layercode tunnel running" in out
    assert Path(f"{record}.stopped").read_text() == "SIGINT", "the child was asked to stop, not killed"


def test_ctrl_c_while_the_child_starts_still_stops_it(
    record: Path, health_port: int, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # The SIGINT lands inside `Popen`, after the child exists but before the CLI waits for it.
    monkeypatch.setenv("FAKE_NPX_WAIT", "1")
    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def popen_then_sigint(argv: list[str]) -> subprocess.Popen[bytes]:
        started.append(popen(argv))
        signal.raise_signal(signal.SIGINT)
        return started[-1]

    monkeypatch.setattr(tunnel_cli.subprocess, "Popen", popen_then_sigint)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even when pytest runs with it ignored
    try:
        code = main(["tunnel", "--agent-id", "ag_1", "--port", str(health_port)])
    finally:
        signal.signal(signal.SIGINT, previous)
        for process in started:
            _reap(process)
    assert code == 130
    assert "Tunnel stopped." in capfd.readouterr().err
    [process] = started
    assert process.returncode is not None, "the child was stopped and reaped, not left running"


def _reap(process: subprocess.Popen[Any], *, child: int | None = None) -> None:
    """Make sure `process` (and, when given, the stand-in it started) is gone, and close its pipes."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=DEADLINE)
    if child is not None:  # The CLI did not stop it: it runs on, holding our pipes.
        with suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()
