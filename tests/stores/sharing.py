"""Checks shared by the tests of stores that several processes open at once (SQLite files, Redis servers)."""

from __future__ import annotations

import asyncio

from layercode_agent.stores import AgentStore


async def assert_one_allowance(first: AgentStore, second: AgentStore) -> None:
    """Two stores on the same data (as two worker processes would hold) spend one allowance between them."""
    assert await first.take_allowance("k", count=3, period=60) == 0.0
    assert await second.take_allowance("k", count=3, period=60) == 0.0
    assert await first.take_allowance("k", count=3, period=60) == 0.0

    assert await second.take_allowance("k", count=3, period=60) > 0
    assert await first.take_allowance("k", count=3, period=60) > 0

    # Racing through both, the burst is still exact.
    racing = [store.take_allowance("race", count=5, period=60) for store in (first, second) for _ in range(10)]
    assert (await asyncio.gather(*racing)).count(0.0) == 5
