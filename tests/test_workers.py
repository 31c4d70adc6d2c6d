"""A worker's heartbeat: awaited only when the last one may have expired, renewed in the background otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from layercode_agent.stores import SQLiteStore, StoreUnavailableError
from layercode_agent.turns import HEARTBEAT_EVERY, HEARTBEAT_TTL
from layercode_agent.turns.workers import Workers

pytestmark = pytest.mark.anyio


class HeldStore(SQLiteStore):
    """A shared store whose marker writes wait until the test lets them through (or fail, if told to)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.writes = 0
        self.fail = False

    async def set_marker(self, conversation_id: str, name: str, value: str, **kwargs: Any) -> str | None:
        self.writes += 1
        await self.gate.wait()
        if self.fail:
            raise StoreUnavailableError("the disk is gone")
        return await super().set_marker(conversation_id, name, value, **kwargs)


def workers(store: HeldStore, tasks: list[asyncio.Task[None]]) -> Workers:
    def spawn(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        tasks.append(asyncio.get_running_loop().create_task(work))
        return tasks[-1]

    return Workers(store, owner="w1", poll_interval=0.05, active={}, spawn=spawn)


async def beat_aged(worker: Workers, age: float) -> None:
    worker._heartbeat_at = asyncio.get_running_loop().time() - age  # pyright: ignore[reportPrivateUsage]
    await worker.heartbeat()


async def test_a_heartbeat_that_may_have_expired_is_awaited(tmp_path: Path) -> None:
    async with HeldStore(tmp_path / "c.db") as store:
        tasks: list[asyncio.Task[None]] = []
        worker = workers(store, tasks)
        beating = asyncio.ensure_future(beat_aged(worker, HEARTBEAT_TTL))
        await asyncio.sleep(0.05)
        assert store.writes == 1 and not beating.done()  # Waits for the write.
        store.gate.set()
        await asyncio.wait_for(beating, 10)
        assert tasks == []
        assert await store.get_markers([("", "worker:w1")]) == ["alive"]


async def test_a_standing_heartbeat_is_renewed_in_the_background(tmp_path: Path) -> None:
    async with HeldStore(tmp_path / "c.db") as store:
        tasks: list[asyncio.Task[None]] = []
        worker = workers(store, tasks)
        await asyncio.wait_for(beat_aged(worker, HEARTBEAT_EVERY), 10)  # Returns with the write still held.
        assert len(tasks) == 1 and not tasks[0].done()
        await asyncio.wait_for(beat_aged(worker, 0), 10)  # Fresh: nothing written.
        assert store.writes == 1
        store.gate.set()
        await asyncio.wait_for(tasks[0], 10)
        assert await store.get_markers([("", "worker:w1")]) == ["alive"]


async def test_a_failed_background_renewal_makes_the_next_heartbeat_awaited(tmp_path: Path) -> None:
    async with HeldStore(tmp_path / "c.db") as store:
        tasks: list[asyncio.Task[None]] = []
        worker = workers(store, tasks)
        store.fail = True
        store.gate.set()
        await beat_aged(worker, HEARTBEAT_EVERY)
        await asyncio.wait_for(tasks[0], 10)  # Logged, not raised.
        with pytest.raises(StoreUnavailableError):
            await worker.heartbeat()  # Not skipped as fresh: awaited, and its failure is the caller's.
        assert store.writes == 2
