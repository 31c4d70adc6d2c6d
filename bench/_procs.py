"""The processes the bench starts, the cores they run on, and what they cost.

Every process is started here on 127.0.0.1, pinned with `taskset` (or `os.sched_setaffinity` when the binary is
missing), and stopped by its own PID: SIGINT or SIGTERM first, SIGKILL after a grace period.

CPU time is read from the kernel's per-process CPU clock (`clock_gettime` on the clock id Linux derives from a
PID, the same user+system time `/proc/<pid>/stat` reports, but in nanoseconds instead of 10 ms ticks, and
including threads that have already exited); `/proc/<pid>/stat` is the fallback. Memory is `VmHWM`, the peak
resident set, from `/proc/<pid>/status`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

_T = TypeVar("_T")

__all__ = [
    "REPO",
    "FakeLLMProcess",
    "FloorProcess",
    "Pinning",
    "available_cores",
    "RedisProcess",
    "ServerProcess",
    "cpu_seconds",
    "machine_busy_seconds",
    "free_port",
    "peak_rss_mib",
    "plan_pinning",
    "process_tree",
]

REPO = Path(__file__).resolve().parents[1]
"""The repository root: `python -m bench.fake_llm` runs from here."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- Cores ------------------------------------------------------------------------------------------


@dataclass
class Pinning:
    """Which cores the server gets, which ones the load generator, fake LLM and Redis get, and why."""

    server: list[int] | None
    load: list[int] | None
    notes: list[str] = field(default_factory=list[str])

    def describe(self, *, redis: bool = False, backend: str = "server") -> str:
        if self.server is None or self.load is None:
            return "not pinned"
        others = "load generator, fake LLM and Redis" if redis else "load generator and fake LLM"
        return f"{backend} on {_on(self.server)}, {others} on {_on(self.load)}"


def _on(cores: Sequence[int]) -> str:
    return ("core " if len(cores) == 1 else "cores ") + _cores(cores)


def _cores(cores: Sequence[int]) -> str:
    return ",".join(str(core) for core in cores)


def plan_pinning(workers: int, *, pin: bool = True) -> Pinning:
    """Give the server `workers` cores (0, 1, ...) and everything else the rest, sharing only when there is none."""
    if not pin:
        return Pinning(None, None, ["pinning disabled (--no-pin)"])
    if not hasattr(os, "sched_getaffinity"):
        return Pinning(None, None, ["pinning is not possible on this OS (no sched_setaffinity): nothing is pinned"])
    available = available_cores()
    server = available[:workers]
    load = available[workers:]
    notes: list[str] = []
    if len(server) < workers:
        notes.append(f"{workers} workers share {len(server)} core(s)")
    if not load:
        load = available[-1:]
        notes.append(f"no core left for the load generator: it shares core {_cores(load)} with the server")
    if shutil.which("taskset") is None:
        notes.append("taskset not found: children are pinned with sched_setaffinity right after they start")
    return Pinning(server, load, notes)


@functools.cache
def available_cores() -> list[int]:
    """The cores this process could use before it pinned itself anywhere (all of them where affinity is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def run_async(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run `coroutine` on uvloop, the loop the server runs on, when it is installed."""
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it on Linux and macOS; plain asyncio works too.
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def pin_self(cores: list[int] | None) -> None:
    """Move this process (the load generator) onto `cores`."""
    if cores is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def _spawn(
    argv: list[str],
    cores: list[int] | None,
    *,
    cwd: str | Path,
    env: dict[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | None = None,
) -> subprocess.Popen[bytes]:
    taskset = shutil.which("taskset")
    if cores is not None and taskset is not None:
        argv = [taskset, "-c", _cores(cores), *argv]
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
    if cores is not None and taskset is None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(process.pid, cores)
    return process


def _stop(process: subprocess.Popen[bytes] | None, signum: int, grace: float = 15.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for pid in reversed(process_tree(process.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=5)


# --- CPU and memory -------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (uvicorn's workers under `--workers N`), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after its last ")".
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree = [pid]
    for parent in tree:
        tree.extend(children.get(parent, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes have used so far (exited threads included; gone processes: 0)."""
    total = 0.0
    for pid in pids:
        try:
            # Linux's process CPU clock id: MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED), nanosecond resolution.
            total += time.clock_gettime((~pid << 3) | 2)
        except (OSError, OverflowError):
            total += _stat_cpu_seconds(pid)
    return total


def _stat_cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (`/proc/stat`), 0 where unknown."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def peak_rss_mib(pids: Sequence[int]) -> float:
    """The sum of the processes' peak resident set sizes (`VmHWM`), in MiB."""
    total_kib = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


# --- The processes ---------------------------------------------------------------------------------


class FakeLLMProcess:
    """`python -m bench.fake_llm` in its own process; `base_url` is what `OPENAI_BASE_URL` gets."""

    def __init__(self, *, ttft_ms: float, tokens: int, token_ms: float, cores: list[int] | None) -> None:
        argv = [sys.executable, "-m", "bench.fake_llm", "--port", "0", "--ttft-ms", str(ttft_ms)]
        argv += ["--tokens", str(tokens), "--token-ms", str(token_ms)]
        self.process = _spawn(argv, cores, cwd=REPO, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=10)
            raise RuntimeError(f"the fake LLM exited with {self.process.returncode} before it listened")
        ready = json.loads(line)
        self.pid = self.process.pid
        self.loop = str(ready["loop"])
        self.base = f"http://127.0.0.1:{ready['port']}"
        self.base_url = f"{self.base}/v1"

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM)
        if self.process.stdout is not None:
            self.process.stdout.close()


class FloorProcess:
    """`python -m bench.floor`, the framework-free reference backend, pinned like the server (one process)."""

    store_url = "floor://"
    """Where its history is read back: its own `GET /history/{conversation_id}`."""
    admin_token = ""

    def __init__(self, *, llm_base_url: str, cores: list[int] | None) -> None:
        self.secret = "bench_" + secrets.token_hex(16)
        argv = [sys.executable, "-m", "bench.floor", "--port", "0", "--llm-base-url", llm_base_url]
        env = {**os.environ, "FLOOR_WEBHOOK_SECRET": self.secret}
        self.process = _spawn(argv, cores, cwd=REPO, env=env, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=10)
            raise RuntimeError(f"the floor exited with {self.process.returncode} before it listened")
        ready = json.loads(line)
        self.pid = self.process.pid
        self.loop = str(ready["loop"])
        self.port = int(ready["port"])
        self.base = f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM)
        if self.process.stdout is not None:
            self.process.stdout.close()


class RedisProcess:
    """A `redis-server` on a free port that keeps nothing on disk, in a temporary directory of its own."""

    def __init__(self, cores: list[int] | None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("the redis store needs redis-server on PATH (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = tempfile.TemporaryDirectory(prefix="bench-redis-")
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", self._directory.name, "--daemonize", "no", "--protected-mode", "yes"]
        self.version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
        self.process = _spawn(argv, cores, cwd=self._directory.name, stdout=subprocess.DEVNULL)
        self.pid = self.process.pid
        deadline = time.monotonic() + 10
        while not self._ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM)
        self._directory.cleanup()


def _server_env(settings: dict[str, str]) -> dict[str, str]:
    """The environment minus every variable the server reads, so only the bench's settings count."""
    from layercode_agent.config import Settings

    known = {name.upper() for name in Settings.model_fields}
    known |= {"GOOGLE_GENERATIVE_AI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "WEB_CONCURRENCY", "WORKERS"}
    env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in known and not key.endswith(("_API_KEY", "_TOKEN"))
    }
    return {**env, **settings}


class ServerProcess:
    """The real `layercode-agent serve`, pinned, with the bench's settings; `pids()` lists its processes."""

    def __init__(self, *, store_url: str, llm_base_url: str, workers: int, cores: list[int] | None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.secret = "bench_" + secrets.token_hex(16)
        self.admin_token = "bench_" + secrets.token_hex(16)
        self.store_url = store_url
        # Its own working directory: a developer's .env must not change what is measured.
        self.directory = tempfile.TemporaryDirectory(prefix="bench-server-")
        env = _server_env(
            {
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                "LAYERCODE_WEBHOOK_SECRET": self.secret,
                "AGENT_MODEL": "openai-chat:bench",
                "OPENAI_BASE_URL": llm_base_url,
                "OPENAI_API_KEY": "bench-not-a-key",
                "CONVERSATION_STORE": store_url,
                "DATA_DIR": self.directory.name,
                "LOG_LEVEL": "warning",
                # The memory store lives inside the server: its history is read back through the admin API.
                "ADMIN_TOKEN": self.admin_token,
            }
        )
        command = shutil.which("layercode-agent", path=str(Path(sys.executable).parent))
        argv = [command] if command else [sys.executable, "-m", "layercode_agent"]
        argv += ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        self.log_path = Path(self.directory.name) / "server.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.process = _spawn(argv, cores, cwd=self.directory.name, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self._wait_ready(workers)

    def _wait_ready(self, workers: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log}")
            try:
                ready = httpx.get(f"{self.base}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                ready = False
            # Under --workers N, wait until every worker runs (the supervisor plus N children).
            if ready and len(self.pids()) >= (1 if workers == 1 else workers + 1):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s:\n{self.log}")

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        _stop(self.process, signal.SIGINT)
        self._log.close()
        self.directory.cleanup()
