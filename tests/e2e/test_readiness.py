"""`/ready` tells a load balancer when this server can only apologise; `/health` keeps saying the process lives.

Against the real server: SQLite with its write lock held by another process or its disk stalled, and a real
`redis-server` stopped and restarted, or hung (SIGSTOP). Each test waits for the answer it expects, with a
generous deadline: nothing measures time.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ..fakes.openai_server import FakeOpenAI
from ..fakes.redis_server import RedisServer
from ..fakes.server_process import ServerProcess, server_env, sqlite_url
from ..fakes.stalled_disk import hit_path, stall_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PATIENCE = 90.0


async def wait_for_ready(http: httpx.AsyncClient, server: ServerProcess, status: int) -> httpx.Response:
    """Ask `/ready` until it answers `status`, and return that answer."""
    async with asyncio.timeout(PATIENCE):
        while True:
            response = await http.get(f"{server.base}/ready")
            if response.status_code == status:
                return response
            await asyncio.sleep(0.1)


def assert_not_ready(response: httpx.Response, *hidden: str) -> None:
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "reason": "the conversation store is not answering"}
    assert response.headers["retry-after"] == "5"
    for text in hidden:
        assert text not in response.text


async def assert_alive(http: httpx.AsyncClient, server: ServerProcess) -> None:
    response = await http.get(f"{server.base}/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@contextmanager
def write_lock_held(database: Path) -> Generator[None]:
    """Another process's connection holds the database's write lock, as a long write of another worker would."""
    blocker = sqlite3.connect(database, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        yield
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()


@contextmanager
def disk_stalled(flag: Path) -> Generator[None]:
    flag.write_text("*")
    try:
        yield
    finally:
        flag.unlink(missing_ok=True)


@pytest.mark.parametrize("trouble", ["write lock held", "disk stalled"])
async def test_ready_follows_the_sqlite_store(tmp_path: Path, fake_llm: FakeOpenAI, trouble: str) -> None:
    data = tmp_path / "data"
    flag = tmp_path / "stall"
    env = {
        **server_env(fake_llm, data, secret="whsec_ready", welcome="", store_url=sqlite_url(data)),
        **stall_env(flag),
    }
    with ServerProcess(env, cwd=tmp_path) as server:
        async with httpx.AsyncClient(timeout=PATIENCE) as http:
            ready = await http.get(f"{server.base}/ready")
            assert (ready.status_code, ready.json()) == (200, {"status": "ready"})

            with write_lock_held(data / "conversations.db") if trouble == "write lock held" else disk_stalled(flag):
                assert_not_ready(await wait_for_ready(http, server, 503), str(data), "conversations.db")
                if trouble == "disk stalled":
                    assert hit_path(flag).exists()  # The check really reached the disk.
                # Probes while the store is stuck share the one stuck check: each still answers in its deadline.
                for _ in range(3):
                    assert_not_ready(await http.get(f"{server.base}/ready"))
                await assert_alive(http, server)

            back = await wait_for_ready(http, server, 200)
            assert back.json() == {"status": "ready"}
        log = server.log
    assert log.count("not ready: the conversation store failed its check") == 1
    assert "ready again" in log


async def test_ready_follows_a_redis_store_that_stops_restarts_and_hangs(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    with RedisServer() as redis:
        store_url = f"{redis.url}?prefix=ready:"
        env = server_env(fake_llm, tmp_path / "data", secret="whsec_ready", welcome="", store_url=store_url)
        with ServerProcess(env, cwd=tmp_path) as server:
            async with httpx.AsyncClient(timeout=PATIENCE) as http:
                assert (await wait_for_ready(http, server, 200)).json() == {"status": "ready"}

                redis.stop()  # Down: connections are refused.
                assert_not_ready(await wait_for_ready(http, server, 503), f"{redis.port}", "127.0.0.1", "Redis")
                await assert_alive(http, server)
                restarted = RedisServer(port=redis.port).start()
                try:
                    assert (await wait_for_ready(http, server, 200)).json() == {"status": "ready"}

                    restarted.pause()  # Hung: connections open, nothing answers.
                    try:
                        assert_not_ready(await wait_for_ready(http, server, 503), f"{redis.port}")
                        await assert_alive(http, server)
                    finally:
                        restarted.resume()
                    assert (await wait_for_ready(http, server, 200)).json() == {"status": "ready"}
                finally:
                    restarted.stop()
            log = server.log
    assert log.count("not ready: the conversation store failed its check") == 2
    assert log.count("ready again") == 2
