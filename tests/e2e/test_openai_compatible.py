"""The real server under uvicorn, an OpenAI-compatible streaming fake as the LLM, spoken to as Layercode does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from layercode_agent.client import WebhookClient

from ..fakes.openai_server import FakeOpenAI, Reply
from ..fakes.server_process import ServerProcess, server_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_e2e"


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def env(tmp_path: Path, fake_llm: FakeOpenAI) -> dict[str, str]:
    return server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome="Hello from the test.")


async def test_first_tts_arrives_while_the_llm_is_still_generating(
    env: dict[str, str], tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    tokens = [f" word{index}" for index in range(20)]
    fake_llm.script(Reply(tokens=["Hi"]), Reply(tokens=tokens, first_token_delay=0.05, token_delay=0.1))
    with ServerProcess(env, cwd=tmp_path) as server:
        async with WebhookClient(server.url, SECRET) as client:
            await client.say("warm up")
            arrivals: list[tuple[float, str]] = []
            async for at, event in client.stream(client.body("message", text="talk to me")):
                arrivals.append((at, event["type"]))
    tts = [at for at, kind in arrivals if kind == "response.tts"]
    assert arrivals[-1][1] == "response.end"
    assert len(tts) >= 10, "deltas must be streamed one by one, not batched"
    # The LLM needs about 1.95 s for the whole reply; the first word must be out long before.
    assert tts[0] < 1000
    assert tts[-1] - tts[0] > 1000
    received = fake_llm.received[-1]
    assert received.body["stream"] is True
    assert received.last_token_at is not None and received.first_token_at is not None


async def test_history_survives_a_restart(env: dict[str, str], tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Reply(tokens=["Nice", " to", " meet", " you", " Ada."]))
    with ServerProcess(env, cwd=tmp_path) as server:
        async with WebhookClient(server.url, SECRET, conversation_id="conv_restart") as client:
            first = await client.say("My name is Ada.")
    assert first.text == "Nice to meet you Ada."
    fake_llm.script(Reply(tokens=["Your", " name", " is", " Ada."]))
    with ServerProcess(env, cwd=tmp_path) as server:
        async with WebhookClient(server.url, SECRET, conversation_id="conv_restart") as client:
            second = await client.say("What is my name?")
    assert second.text == "Your name is Ada."
    sent = fake_llm.received[-1].messages
    contents = [(message["role"], message.get("content")) for message in sent if message["role"] != "system"]
    assert contents == [
        ("user", "My name is Ada."),
        ("assistant", "Nice to meet you Ada."),
        ("user", "What is my name?"),
    ]


async def test_llm_errors_and_malformed_streams_get_an_apology(
    env: dict[str, str], tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    # Every request fails the same way, so retries inside the OpenAI client cannot hide the failure.
    with ServerProcess({**env, "LLM_TIMEOUT": "5"}, cwd=tmp_path) as server:
        async with WebhookClient(server.url, SECRET) as client:
            try:
                fake_llm.default = Reply(fail="http500")
                broken = await client.say("hello")
                fake_llm.default = Reply(fail="malformed")
                malformed = await client.say("hello again")
            finally:
                fake_llm.default = Reply()
        log = server.log
    for result in (broken, malformed):
        assert result.types[-1] == "response.end"
        assert result.types.count("response.end") == 1
        assert "Sorry" in result.text
    assert "LLM failed" in log


async def test_hang_up_mid_stream_cancels_generation_and_server_stays_healthy(
    env: dict[str, str], tmp_path: Path, fake_llm: FakeOpenAI
) -> None:
    fake_llm.script(Reply(tokens=[f" w{index}" for index in range(100)], token_delay=0.05))
    with ServerProcess(env, cwd=tmp_path) as server:
        async with WebhookClient(server.url, SECRET, conversation_id="conv_hangup") as client:
            seen = 0
            async for _, event in client.stream(client.body("message", text="tell me a long story")):
                if event["type"] == "response.tts":
                    seen += 1
                if seen == 3:
                    break  # the caller hangs up: the request is aborted
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient() as http:
                health = await http.get(f"{server.base}/health")
            fake_llm.script(Reply(tokens=["Still", " here."]))
            after = await client.say("are you there?")
        log = server.log
    assert health.json() == {"status": "ok"}
    assert after.text == "Still here."
    assert "turn interrupted" in log
    # The interrupted reply was saved with what had been sent, and the next request shows it.
    sent = fake_llm.received[-1].messages
    assistant = [message for message in sent if message["role"] == "assistant"]
    assert assistant and assistant[0]["content"].startswith("w0 w1")
    # Generation stopped when the caller left: the LLM stream was closed long before its 100 tokens.
    assert fake_llm.received[-2].tokens_sent < 60
    assert "Task was destroyed" not in log and "Traceback" not in log
