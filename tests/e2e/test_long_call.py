"""A long call: a conversation goes on well past a hundred turns, each with its own usage allowance.

pydantic-ai checks a run's usage limits (50 requests by default) against the usage the run starts
from; a turn started from the conversation's running total would fail from the 51st turn on. This
runs the real `layercode-agent serve` against the OpenAI-compatible fake for 120 turns of one
conversation, on SQLite, and checks every answer was the model's and the stored total kept growing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_ai.usage import RunUsage

from layercode_agent.agent import APOLOGY
from layercode_agent.client import WebhookClient
from layercode_agent.stores import open_store

from ..fakes.history import dialogue
from ..fakes.openai_server import FakeOpenAI, Received, Reply
from ..fakes.server_process import ServerProcess, server_env, sqlite_url

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_long_call"
TURNS = 120


def numbered(received: Received) -> Reply:
    """The reply to the caller's `turn N`: `Reply N of M`, M the messages the LLM was sent (system prompt aside)."""
    said = dialogue(received)
    return Reply(tokens=["Reply", f" {said[-1][1].split()[-1]}", f" of {len(said)}."])


async def stored_usage(store_url: str, conversation_id: str) -> RunUsage:
    async with open_store(store_url) as store:
        record = await store.read_record(conversation_id)
    assert record is not None
    return record.usage


async def test_a_call_of_a_hundred_and_twenty_turns_is_answered_by_the_model_every_time(
    tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    fake_llm.responder = numbered
    store_url = sqlite_url(tmp_path / "data")
    env = server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="", store_url=store_url)
    answers: list[str] = []
    totals: list[int] = []
    with ServerProcess(env, cwd=tmp_path) as server:
        async with WebhookClient(server.url, SECRET) as client:
            for index in range(TURNS):
                result = await client.say(f"turn {index}")
                assert result.status == 200, (index, result.body)
                assert result.types[-1] == "response.end", (index, result.types)
                answers.append(result.text)
                if index in (0, TURNS // 2 - 1, TURNS - 1):
                    totals.append((await stored_usage(store_url, client.conversation_id)).requests)
        log = server.log

    apologies = [index for index, text in enumerate(answers) if APOLOGY in text]
    assert apologies == [], f"turns {apologies[:5]}... got the apology"
    assert answers == [f"Reply {index} of {2 * index + 1}." for index in range(TURNS)]
    assert len(fake_llm.received) == TURNS
    # The last request carried the whole call, in order.
    assert dialogue(fake_llm.received[-1])[-3:] == [
        ("user", f"turn {TURNS - 2}"),
        ("assistant", f"Reply {TURNS - 2} of {2 * TURNS - 3}."),
        ("user", f"turn {TURNS - 1}"),
    ]
    # Every turn's request joins the conversation's total.
    assert totals == [1, TURNS // 2, TURNS]
    assert "UsageLimitExceeded" not in log and "LLM failed" not in log
