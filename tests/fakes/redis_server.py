"""A real `redis-server` on 127.0.0.1, started for the tests and stopped by its own PID.

Not a fake: the store tests prove their promises against the server production uses. It keeps
nothing on disk (`--save "" --appendonly no`) and runs in its own temporary directory, unless told to
keep its data in a directory: then it logs every write to an append-only file there, as a production
Redis with persistence does, and a server started again on that directory has the data back.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .net import free_port

INSTALL_HINT = (
    "The Redis store tests need the redis-server binary on PATH. Install it with "
    "`apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` (macOS); .ci/run installs it in CI."
)


class RedisServer:
    """`with RedisServer() as server:`; `server.url` is `redis://127.0.0.1:<port>/0`.

    Pass `port=` to start a new server where a stopped one listened (a restart, as clients see it),
    `password=` to require one (`requirepass`); the URL then carries it: `redis://:<password>@127.0.0.1:<port>/0`.
    Pass `keep_data_in=` a directory to persist the data there (kept after `stop`), so that
    `RedisServer(port=old.port, keep_data_in=same)` is a restart that lost nothing.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        startup_timeout: float = 10.0,
        keep_data_in: Path | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.password = password
        self.keep_data_in = keep_data_in
        credentials = f":{password}@" if password else ""
        self.url = f"redis://{credentials}127.0.0.1:{self.port}/0"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._directory: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self._directory = tempfile.TemporaryDirectory(prefix="redis-test-")
        directory = Path(self._directory.name)
        self._log = (directory / "redis.log").open("ab")
        # redis-server [config options]: each `--name value` pair is a line of redis.conf.
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.keep_data_in is not None:
            # Every write fsynced before it is acknowledged; the file is replayed when a server starts there.
            argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.keep_data_in)]
        else:
            argv += ["--appendonly", "no", "--dir", str(directory)]
        argv += ["--daemonize", "no", "--protected-mode", "yes"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv, cwd=directory, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log
                self.stop()
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            if self.ping():
                return self
            time.sleep(0.05)
        log = self.log
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING in {self.startup_timeout}s:\n{log}")

    def ping(self) -> bool:
        """Whether the server answers PING right now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(_command("AUTH", self.password))
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(_command("PING"))
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """Hang the server as a stuck host would (SIGSTOP to its own PID): connections open, nothing answers."""
        assert self.process is not None and self.process.poll() is None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s) and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # A paused server cannot act on SIGTERM.
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self._directory is not None:
            self._log.close()
            self._directory.cleanup()
            self._directory = None

    @property
    def log(self) -> str:
        if self._directory is None:
            return ""
        path = Path(self._directory.name) / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _command(*parts: str) -> bytes:
    """One command in RESP, Redis's wire format (an array of bulk strings)."""
    encoded = [part.encode() for part in parts]
    return f"*{len(encoded)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded)
