"""`layercode-agent simulate` against the real server: an OpenAI-compatible fake for exact text, the embedded model.

The fake answers from what the caller said (an echo, a long story, a slow or a secret reply), so the scenarios of
every test can share one server and run in parallel without scripting replies in order.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layercode_agent.cli import main
from layercode_agent.simulate import Scenario, ScenarioResult, load_scenarios, run_scenarios

from ..fakes.openai_server import FakeOpenAI, Received, Reply
from ..fakes.server_process import ServerProcess, server_env, sqlite_url

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_simulate"
WELCOME = "Welcome to the simulation."
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
STORY = [f" word{index}" for index in range(60)]
SLOW_S = 0.8


def _text(content: Any) -> str:
    return content if isinstance(content, str) else ""


def last_user_text(received: Received) -> str:
    users = [_text(message.get("content")) for message in received.messages if message.get("role") == "user"]
    return users[-1] if users else ""


def answer(received: Received) -> Reply:
    """What the fake LLM says, chosen by the caller's last words."""
    said = last_user_text(received)
    if said.startswith("story"):
        return Reply(tokens=STORY, token_delay=0.03)
    if said.startswith("slow"):
        return Reply(tokens=["Sorry", " for", " the", " wait."], first_token_delay=SLOW_S)
    if said.startswith("secret"):
        return Reply(tokens=["The", " secret", " code", " is", " 42."])
    return Reply(tokens=["You", " said:", f" {said}"])


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(responder=answer) as fake:
        yield fake


@pytest.fixture(scope="module")
def server(fake_llm: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp_path = tmp_path_factory.mktemp("simulate")
    data_dir = tmp_path / "data"
    env = server_env(fake_llm, data_dir, secret=SECRET, welcome=WELCOME, store_url=sqlite_url(data_dir))
    with ServerProcess(env, cwd=tmp_path) as process:
        yield process
    assert "Traceback" not in process.log


def scenarios(tmp_path: Path, text: str) -> list[Scenario]:
    path = tmp_path / f"{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(text)
    return load_scenarios(path)


def reasons(result: ScenarioResult) -> dict[int, list[str]]:
    return {step.number: step.failures for step in result.steps}


def requests_saying(fake_llm: FakeOpenAI, text: str) -> list[Received]:
    return [received for received in fake_llm.received if last_user_text(received) == text]


async def test_expectations_pass_and_fail_as_written(tmp_path: Path, server: ServerProcess) -> None:
    tag = uuid.uuid4().hex[:6]
    (scenario,) = scenarios(
        tmp_path,
        f"""
name: expectations
metadata: {{plan: pro}}
welcome:
  expect: {{contains: welcome to THE simulation, max_first_token_ms: 5000}}
steps:
  - say: ping-{tag}
    expect:
      contains: [you said, PING-{tag}]
      not_contains: pong
      regex: 'said: ping-\\w+$'
      not_regex: '\\d{{7}}'
      max_first_token_ms: 5000
      max_total_ms: 10000
  - say: slow question
    expect: {{max_first_token_ms: 300, contains: wait}}
  - say: ping again
    expect: {{contains: [pong, ping], regex: '^Pong'}}
  - say: secret please
    expect: {{not_contains: SECRET, not_regex: '\\d+'}}
  - say: ping with a tight total
    expect: {{max_total_ms: 0.5}}
  - data: {{button: ok}}
    expect: {{contains: '"status": "ok"'}}
  - data: {{button: other}}
    expect: {{contains: nope, not_contains: status}}
  - end: true
""",
    )
    (result,) = await run_scenarios([scenario], url=server.url, secret=SECRET)

    assert not result.passed
    assert len(result.steps) == result.planned == 9
    welcome = result.steps[0]
    assert (welcome.kind, welcome.text, welcome.event_types) == ("welcome", WELCOME, ["response.tts", "response.end"])
    first = result.steps[1]
    assert first.text == f"You said: ping-{tag}"
    assert first.first_token_ms is not None and first.total_ms is not None
    assert 0 < first.first_token_ms <= first.total_ms
    assert first.event_types[-1] == "response.end"
    slow = result.steps[2]
    assert slow.first_token_ms is not None and slow.first_token_ms >= SLOW_S * 1000
    failures = reasons(result)
    assert failures[0] == [] and failures[1] == []
    assert failures[2] == [f"first token after {slow.first_token_ms:.0f} ms, over max_first_token_ms 300"]
    assert failures[3] == ["the reply does not contain 'pong'", "the reply does not match /^Pong/"]
    assert failures[4] == ["the reply contains 'SECRET'", "the reply matches /\\d+/ at '42'"]
    assert len(failures[5]) == 1 and failures[5][0].endswith("over max_total_ms 0.5")
    assert failures[6] == []
    assert result.steps[6].text == '{"status": "ok"}'
    assert failures[7] == ["the JSON content does not contain 'nope'", "the JSON content contains 'status'"]
    assert failures[8] == [] and result.steps[8].status == 200
    assert [step.number for step in result.failed_steps] == [2, 3, 4, 5, 7]
    assert result.first_token_p50 is not None and result.first_token_max == slow.first_token_ms


async def test_status_and_a_missing_response_end(tmp_path: Path, server: ServerProcess, fake_llm: FakeOpenAI) -> None:
    wrong_secret, expected_401 = scenarios(
        tmp_path,
        """
scenarios:
  - name: default status
    steps: [{say: hello}, {say: never sent}]
  - name: expected 401
    steps: [{say: hello, expect: {status: 401, contains: signature}}]
""",
    )
    results = await run_scenarios([wrong_secret, expected_401], url=server.url, secret="not-the-secret")
    assert [result.passed for result in results] == [False, True]
    (failure,) = results[0].steps[0].failures
    assert failure.startswith("HTTP status 401, expected 200: ") and "signature" in failure
    # A failed expectation does not stop the conversation: the second `say` was sent too.
    assert len(results[0].steps) == 2

    # A backend answering a `message` with plain JSON (here the fake LLM's own endpoint) sends no response.end.
    (plain,) = scenarios(
        tmp_path, "name: plain\nsteps: [{say: hi}, {say: hi, expect: {ends_with_response_end: false}}]"
    )
    (result,) = await run_scenarios([plain], url=f"{fake_llm.base_url}/chat/completions", secret=SECRET)
    assert reasons(result) == {1: ["the stream ended without response.end (events: none)"], 2: []}


async def test_barge_in_sends_what_was_heard_with_the_next_message(
    tmp_path: Path, server: ServerProcess, fake_llm: FakeOpenAI
) -> None:
    tag = uuid.uuid4().hex[:6]
    (scenario,) = scenarios(
        tmp_path,
        f"""
name: barge-in
steps:
  - say: story-{tag}
    interrupt_after_words: 3
    expect: {{contains: word2, not_contains: word3, max_first_token_ms: 5000}}
  - data: {{while: listening}}
  - say: stop-{tag}
    pause_ms: 100
    expect: {{contains: stop-{tag}}}
  - say: again-{tag}
  - say: short-{tag}
    interrupt_after_words: 10
""",
    )
    (result,) = await run_scenarios([scenario], url=server.url, secret=SECRET)

    story = result.steps[0]
    assert story.interrupted and story.text == "word0 word1 word2"
    assert "response.end" not in story.event_types
    assert story.passed, story.failures
    # The aborted request stopped the LLM stream early.
    (story_request,) = requests_saying(fake_llm, f"story-{tag}")
    assert story_request.tokens_sent < len(STORY)
    # The next `say` (not the data step between) carried interruption_context: the LLM saw what was heard.
    (after,) = requests_saying(fake_llm, f"stop-{tag}")
    dialogue = [(m["role"], _text(m.get("content"))) for m in after.messages if m["role"] != "system"]
    assert dialogue == [
        ("user", f"story-{tag}"),
        ("assistant", "word0 word1 word2 [interrupted]"),
        ("user", f"stop-{tag}"),
    ]
    # Only once: the message after that carries none, so the history keeps what was heard, unmarked again.
    (later,) = requests_saying(fake_llm, f"again-{tag}")
    assert [m["role"] for m in later.messages if m["role"] != "system"] == [
        *("user", "assistant", "user", "assistant", "user")
    ]
    assert reasons(result) == {
        1: [],
        2: [],
        3: [],
        4: [],
        5: ["the reply ended after 3 word(s), before the caller could interrupt after 10"],
    }


async def test_scenarios_run_in_parallel_up_to_the_concurrency(
    tmp_path: Path, server: ServerProcess, fake_llm: FakeOpenAI
) -> None:
    tag = uuid.uuid4().hex[:6]
    listed = "\n".join(f"  - name: slow {i}\n    steps: [{{say: slow-{tag}-{i}}}]" for i in range(4))
    four = scenarios(tmp_path, f"scenarios:\n{listed}\n")

    def arrivals(prefix: str) -> list[float]:
        return sorted(r.at for r in fake_llm.received if last_user_text(r).startswith(prefix))

    started = time.monotonic()
    parallel = await run_scenarios(four, url=server.url, secret=SECRET, concurrency=4)
    parallel_s = time.monotonic() - started
    assert all(result.passed for result in parallel)
    assert [result.name for result in parallel] == ["slow 0", "slow 1", "slow 2", "slow 3"]
    assert len({result.conversation_id for result in parallel}) == 4, "each scenario is its own conversation"
    at = arrivals(f"slow-{tag}-")
    assert len(at) == 4 and at[-1] - at[0] < SLOW_S / 2, "all four turns reached the LLM together"
    assert parallel_s < 4 * SLOW_S

    tag = uuid.uuid4().hex[:6]
    listed = "\n".join(f"  - name: slow {i}\n    steps: [{{say: slow-{tag}-{i}}}]" for i in range(3))
    three = scenarios(tmp_path, f"scenarios:\n{listed}\n")
    finished: list[str] = []
    await run_scenarios(
        three, url=server.url, secret=SECRET, concurrency=1, on_result=lambda result: finished.append(result.name)
    )
    at = arrivals(f"slow-{tag}-")
    assert len(at) == 3 and all(later - earlier >= SLOW_S for earlier, later in zip(at, at[1:], strict=False))
    assert finished == ["slow 0", "slow 1", "slow 2"]


def test_cli_exit_code_summary_and_junit(
    tmp_path: Path, server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    passing = tmp_path / "passing.yaml"
    passing.write_text("name: echo\nwelcome: true\nsteps:\n  - say: hello there\n    expect: {contains: hello}\n")
    failing = tmp_path / "failing.yaml"
    failing.write_text(
        "name: wants pong\nsteps:\n  - say: ping\n    expect: {contains: pong}\n  - say: secret\n  - end: true\n"
    )
    report = tmp_path / "reports" / "junit.xml"

    code = main(
        ["simulate", str(passing), str(failing), "--url", server.url, "--secret", SECRET, "--junit", str(report)]
    )
    out = capsys.readouterr().out

    assert code == 1
    assert "Simulating 2 scenarios" in out
    assert "PASS" in out and "FAIL" in out
    assert "Failures" in out
    assert "step 1 (say 'ping'): the reply does not contain 'pong'" in out
    assert "got: 'You said: ping'" in out
    assert "2 scenarios: 1 passed, 1 failed" in out
    suite = ElementTree.parse(report).getroot()
    assert (suite.tag, suite.get("tests"), suite.get("failures")) == ("testsuite", "2", "1")
    echo, pong = suite.findall("testcase")
    assert (echo.get("classname"), echo.get("name"), echo.find("failure")) == ("passing", "echo", None)
    failure = pong.find("failure")
    assert failure is not None
    assert failure.get("message") == "step 1 (say 'ping'): the reply does not contain 'pong'"
    assert "step 3 (session.end) [status 200" in (pong.findtext("system-out") or "")

    assert main(["simulate", str(passing), "--url", server.url, "--secret", SECRET]) == 0
    assert "1 scenario: 1 passed, 0 failed" in capsys.readouterr().out


def test_the_shipped_examples_pass_against_the_embedded_model(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path / "data"), "AGENT_MODEL": "auto", "LAYERCODE_WEBHOOK_SECRET": ""}
    examples = sorted(str(path) for path in EXAMPLES.glob("*.yaml"))
    assert len(examples) == 2
    report = tmp_path / "junit.xml"
    with ServerProcess(env, cwd=tmp_path, startup_timeout=120) as embedded:
        secret = (tmp_path / "data" / "dev-webhook-secret").read_text().strip()
        # The installed console script, as CI would run it. One scenario at a time: the embedded model serves
        # one reply at a time, so parallel scenarios would only queue (and share a busy CPU).
        script = Path(sys.executable).parent / "layercode-agent"
        argv = [str(script)] if script.exists() else [sys.executable, "-m", "layercode_agent"]
        argv += ["simulate", *examples, "--url", embedded.url, "--secret", secret, "--junit", str(report)]
        finished = subprocess.run(
            [*argv, "--concurrency", "1"],
            capture_output=True,
            text=True,
            timeout=240,
            env={**embedded.env, "COLUMNS": "120"},
            cwd=tmp_path,
        )
        log = embedded.log
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "2 scenarios: 2 passed, 0 failed" in finished.stdout
    assert "Traceback" not in finished.stdout + finished.stderr + log
    assert "tiny offline demo model" in log
    suite = ElementTree.parse(report).getroot()
    assert (suite.get("tests"), suite.get("failures")) == ("2", "0")
    assert "interrupted" in (suite.findtext("testcase[@name='barge-in']/system-out") or "")
