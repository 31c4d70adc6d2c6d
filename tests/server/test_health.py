"""Liveness and readiness in-process: `/health` never looks at the store, `/ready` asks it for a write."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from layercode_agent.stores import MemoryStore, StoreUnavailableError

from .conftest import AppFactory

pytestmark = pytest.mark.anyio

WHERE = "SQLite database /srv/agent/private/conversations.db"


class BrokenStore(MemoryStore):
    """A store whose writes fail (`down`) or never finish (`hung`), naming where it lives as real errors do."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.hung = False
        self.checks = 0

    async def set_marker(self, conversation_id: str, name: str, value: str, **options: Any) -> str | None:
        self.checks += 1
        if self.hung:
            await asyncio.Event().wait()
        if self.down:
            raise StoreUnavailableError(f"{WHERE} is locked")
        return await super().set_marker(conversation_id, name, value, **options)


async def test_ready_answers_503_with_a_generic_reason_while_the_store_fails_or_hangs(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    store = BrokenStore()
    caplog.set_level(logging.INFO, logger="layercode_agent")
    async with make_app() as app:
        app.runtime.store = store
        ready = await app.http.get("/ready")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        assert store.checks == 1  # It really asked the store.

        for trouble in ("down", "hung"):
            setattr(store, trouble, True)
            for _ in range(2):
                refused = await asyncio.wait_for(app.http.get("/ready"), 60)
                assert refused.status_code == 503
                assert refused.json() == {
                    "status": "unavailable",
                    "reason": "the conversation store is not answering",
                }
                assert refused.headers["retry-after"] == "5"
                assert "/srv/agent" not in refused.text
                health = await app.http.get("/health")
                assert (health.status_code, health.json()) == (200, {"status": "ok"})
            setattr(store, trouble, False)
            assert (await app.http.get("/ready")).status_code == 200

    warnings = [record.getMessage() for record in caplog.records if "not ready" in record.getMessage()]
    assert len(warnings) == 2  # Once per outage, not once per probe.
    assert WHERE in warnings[0] and "no answer within 1 s" in warnings[1]
    assert sum("ready again" in record.getMessage() for record in caplog.records) == 2


async def test_ready_answers_503_while_the_worker_drains(make_app: AppFactory) -> None:
    async with make_app() as app:
        app.runtime.draining = True
        refused = await app.http.get("/ready")
        health = await app.http.get("/health")
        app.runtime.draining = False
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"status": "draining", "reason": "this worker is shutting down"}
    assert health.status_code == 200
