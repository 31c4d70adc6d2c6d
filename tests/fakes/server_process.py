"""Run the real `layercode-agent serve` under uvicorn on 127.0.0.1, as a user would, and stop it by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .net import free_port
from .openai_server import FakeOpenAI


def sqlite_url(directory: Path) -> str:
    """An absolute SQLite URL (`sqlite:////abs/path.db`) for `conversations.db` in `directory`."""
    return f"sqlite:///{(directory / 'conversations.db').resolve()}"


def server_env(
    fake_llm: FakeOpenAI, data_dir: Path, *, secret: str, welcome: str, store_url: str | None = None
) -> dict[str, str]:
    """The environment of a server whose LLM is `fake_llm`; without `store_url`, the default store in `data_dir`."""
    env = {
        "LAYERCODE_WEBHOOK_SECRET": secret,
        "AGENT_MODEL": "openai-chat:fake-model",
        "OPENAI_BASE_URL": fake_llm.base_url,
        "DATA_DIR": str(data_dir),
        "WELCOME_MESSAGE": welcome,
    }
    if store_url is not None:
        env["CONVERSATION_STORE"] = store_url
    return env


class ServerProcess:
    """`with ServerProcess(env={...}) as server:`; `server.url` is the webhook URL."""

    def __init__(self, env: dict[str, str], *, cwd: Path, args: tuple[str, ...] = (), startup_timeout: float = 60.0):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/api/agent"
        self.cwd = cwd
        self.args = args
        self.env = {
            **{key: value for key, value in os.environ.items() if not key.endswith(("_API_KEY", "_TOKEN"))},
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_LEVEL": "info",
            **env,
        }
        self.startup_timeout = startup_timeout
        self.log_path = cwd / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        command = shutil.which("layercode-agent", path=str(Path(sys.executable).parent))
        argv = [command] if command else [sys.executable, "-m", "layercode_agent"]
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*argv, "serve", *self.args], cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # Closes the log.
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log}")
            try:
                if httpx.get(f"{self.base}/health", timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer /health in {self.startup_timeout}s:\n{self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if not self._log.closed:
            self._log.close()

    def kill(self) -> None:
        """Die as a crash would: SIGKILL to this server's own PID, no shutdown code runs; then reap it.

        Meant for single-process servers: with `--workers N` the workers would outlive their supervisor.
        """
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        if not self._log.closed:
            self._log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
