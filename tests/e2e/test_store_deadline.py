"""A stalled SQLite disk costs the stalled call an apology after `STORE_TIMEOUT`, never the other conversations.

The real server runs on a disk that stalls on demand (`tests.fakes.stalled_disk`): statements naming one
conversation, or every statement, block until the test thaws it. Nothing here measures time: each test holds
the stall until it has seen the outcome the deadline promises, so without a deadline it would still be waiting.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from layercode_agent.agent import APOLOGY
from layercode_agent.client import TurnResult, WebhookClient

from ..fakes.history import stored
from ..fakes.openai_server import FakeOpenAI
from ..fakes.server_process import ServerProcess, server_env, sqlite_url
from ..fakes.stalled_disk import hit_path, stall_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_deadline"
PATIENCE = 90.0
"""Seconds a test waits for an outcome before failing: far beyond the deadline, on a busy machine too."""


def stalling_server(fake_llm: FakeOpenAI, tmp_path: Path, flag: Path) -> ServerProcess:
    env = server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="", store_url=sqlite_url(tmp_path / "data"))
    return ServerProcess({**env, **stall_env(flag), "STORE_TIMEOUT": "1"}, cwd=tmp_path)


async def wait_for_file(path: Path) -> None:
    async with asyncio.timeout(PATIENCE):
        while True:
            if await anyio.Path(path).exists():
                return
            await asyncio.sleep(0.02)


def assert_apology_then_one_end(answer: TurnResult) -> None:
    assert answer.status == 200
    assert answer.text == APOLOGY
    assert answer.types[-1] == "response.end" and answer.types.count("response.end") == 1, answer.types


async def test_a_stalled_conversation_hears_the_apology_while_another_keeps_talking(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    flag = tmp_path / "stall"
    store_url = sqlite_url(tmp_path / "data")
    with stalling_server(fake_llm, tmp_path, flag) as server:
        async with (
            WebhookClient(server.url, SECRET, conversation_id="stalled-conversation") as stalled,
            WebhookClient(server.url, SECRET, conversation_id="other-conversation") as other,
        ):
            assert (await other.say("Hello before the stall.")).text == "Hello there, how can I help?"
            await anyio.Path(flag).write_text(stalled.conversation_id)
            try:
                stalled_turn = asyncio.create_task(stalled.say("Are you there?"))
                await wait_for_file(hit_path(flag))  # The stalled conversation's call is stuck on the disk.

                # Another conversation is answered in full while that call is still stuck.
                async with asyncio.timeout(PATIENCE):
                    answer = await other.say("And now?")
                assert answer.text == "Hello there, how can I help?"
                assert answer.types[-1] == "response.end"

                # The stuck call gave up at its deadline: the caller heard the apology, then response.end.
                async with asyncio.timeout(PATIENCE):
                    apology = await stalled_turn
                assert_apology_then_one_end(apology)
                assert await anyio.Path(flag).exists()  # Still stalled: the deadline answered, not the disk.
            finally:
                await anyio.Path(flag).unlink(missing_ok=True)

            # Thawed: the same conversation goes on, with nothing half-written before it.
            assert (await stalled.say("Still there?")).text == "Hello there, how can I help?"
        log = server.log
    assert f"turn failed conversation={stalled.conversation_id}" in log
    assert "did not answer within 1 s" in log
    rows = await stored(store_url, stalled.conversation_id)
    assert [row.brief[:3] for row in rows] == [
        ("user", None, "Still there?"),
        ("assistant", "completed", "Hello there, how can I help?"),
    ]
    assert [row.brief[:3] for row in await stored(store_url, other.conversation_id)] == [
        ("user", None, "Hello before the stall."),
        ("assistant", "completed", "Hello there, how can I help?"),
        ("user", None, "And now?"),
        ("assistant", "completed", "Hello there, how can I help?"),
    ]


async def test_a_whole_disk_stall_apologises_to_every_caller_within_the_deadline(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    flag = tmp_path / "stall"
    with stalling_server(fake_llm, tmp_path, flag) as server:
        clients = [WebhookClient(server.url, SECRET) for _ in range(6)]
        try:
            await anyio.Path(flag).write_text("*")  # Every statement blocks, as under fsfreeze.
            try:
                async with asyncio.timeout(PATIENCE):
                    answers = await asyncio.gather(*(client.say("Hello?") for client in clients))
                for answer in answers:
                    assert_apology_then_one_end(answer)
                assert await anyio.Path(flag).exists()
            finally:
                await anyio.Path(flag).unlink(missing_ok=True)
            async with asyncio.timeout(PATIENCE):
                assert (await clients[0].say("Back?")).text == "Hello there, how can I help?"
        finally:
            for client in clients:
                await client.aclose()
        log = server.log
    for client in clients:
        assert f"turn failed conversation={client.conversation_id}" in log
