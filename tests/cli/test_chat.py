"""`layercode-agent chat`, driven as a person would in a pseudo-terminal, against the real server.

One `layercode-agent serve` (with the OpenAI-compatible fake as its LLM) serves every test of the module;
each chat is a conversation of its own. The fake answers from what the caller said, so tests do not depend
on one another's order. What the terminal showed is then checked against what the server stored and what
the LLM was sent.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pexpect
import pytest

from layercode_agent.cli import main

from ..fakes.history import dialogue, session_events, stored, text_of
from ..fakes.net import free_port
from ..fakes.openai_server import FakeOpenAI, Received, Reply
from ..fakes.server_process import ServerProcess, server_env, sqlite_url
from .hostile import ODD_SECRET, ODD_SHOWN, RAW_CONTROL

SECRET = "whsec_chat_test"
WELCOME = "Welcome to the chat test."
PROMPT = "you › "
LONG_STORY = [f" word{index}" for index in range(1000)]
"""50 s of words at 0.05 s each: a busy machine still has plenty of time to cut it short."""
TIMEOUT = 120
"""Seconds any one wait may take on a busy machine before it counts as a hang."""


# --- The server, its LLM and the chat process -------------------------------------------------------


def answer(received: Received) -> Reply:
    """The fake LLM's reply, chosen by the caller's last words (or a tool result)."""
    last = received.messages[-1]
    if last["role"] == "tool":
        return Reply(tokens=["It", " is", " noon."])
    said = text_of(last.get("content"))
    if said == "What time is it?":
        return Reply(tool_call=("current_time", {"timezone": "UTC"}))
    if said == "Tell me a long story.":
        return Reply(tokens=LONG_STORY, token_delay=0.05)
    return Reply(tokens=["Sure,", " go", " ahead."])


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(responder=answer) as fake:
        yield fake


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return sqlite_url(tmp_path_factory.mktemp("chat-store"))


@pytest.fixture(scope="module")
def server(fake_llm: FakeOpenAI, store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cwd = tmp_path_factory.mktemp("chat-server")
    env = server_env(fake_llm, cwd / "data", secret=SECRET, welcome=WELCOME, store_url=store_url)
    with ServerProcess(env, cwd=cwd, startup_timeout=TIMEOUT) as process:
        yield process
    assert "Traceback" not in process.log


def command() -> list[str]:
    found = shutil.which("layercode-agent", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "layercode_agent"]


def child_env() -> dict[str, str]:
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(("LAYERCODE_", "NO_COLOR"))}
    return {**inherited, "NO_COLOR": "1", "TERM": "dumb", "PYTHONIOENCODING": "utf-8"}


class Terminal:
    """`layercode-agent chat ARGS` in a pseudo-terminal of 40x200; `shown` is everything it printed."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.output = io.StringIO()
        argv = [*command(), "chat", *args]
        self.child = pexpect.spawn(
            argv[0], argv[1:], cwd=str(cwd), env=child_env(), encoding="utf-8", dimensions=(40, 200), timeout=TIMEOUT
        )
        self.child.logfile_read = self.output

    @property
    def shown(self) -> str:
        return self.output.getvalue().replace("\r\n", "\n")

    def expect(self, pattern: str) -> None:
        self.child.expect_exact(pattern)

    def prompt(self) -> None:
        """Wait for the `you ›` prompt."""
        self.child.expect_exact(PROMPT)

    def say(self, text: str) -> None:
        self.child.sendline(text)

    def finish(self) -> int:
        """Wait for the process to exit and return its exit status."""
        self.child.expect(pexpect.EOF)
        # The terminal closes a moment before the process is gone; `close()` would signal it if still alive.
        deadline = time.monotonic() + TIMEOUT
        while self.child.isalive():
            assert time.monotonic() < deadline, "the chat closed its terminal but did not exit"
            time.sleep(0.05)
        self.child.close()
        assert "Traceback" not in self.shown, self.shown
        status = self.child.exitstatus
        assert isinstance(status, int), (status, self.child.signalstatus)
        return status

    def stop(self) -> None:
        """Stop the process if it still runs, and close the terminal."""
        if not self.child.closed:
            self.child.close(force=True)


@pytest.fixture
def terminals(tmp_path: Path) -> Iterator[list[Terminal]]:
    """Chat processes started by a test; any still running at the end is stopped (by its own PID)."""
    started: list[Terminal] = []
    yield started
    for terminal in started:
        terminal.stop()


def chat(terminals: list[Terminal], tmp_path: Path, *args: str) -> Terminal:
    terminal = Terminal(list(args), tmp_path)
    terminals.append(terminal)
    return terminal


def piped(tmp_path: Path, args: list[str], said: str, env: dict[str, str] | None = None) -> CompletedProcess[str]:
    """`layercode-agent chat ARGS` with `said` piped to it, run to its end."""
    return subprocess.run(
        [*command(), "chat", *args],
        input=said,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=child_env() if env is None else env,
        timeout=TIMEOUT,
    )


def new_conversation() -> str:
    return f"lc_conv_chat_{uuid.uuid4().hex[:12]}"


# --- What the server kept ---------------------------------------------------------------------------


def transcript(store_url: str, conversation_id: str) -> list[tuple[str, str]]:
    """(role, text) of the transcript the one stored `session.end` carried, checking its timestamps."""
    [event] = asyncio.run(session_events(store_url, conversation_id))
    assert event.event_type == "session.end"
    entries: list[dict[str, Any]] = event.payload["transcript"]
    stamps = [entry["timestamp"] for entry in entries]
    assert all(isinstance(stamp, int) and stamp > 1_600_000_000_000 for stamp in stamps), stamps  # Unix ms
    assert stamps == sorted(stamps)
    return [(entry["role"], entry["text"]) for entry in entries]


def request_after(fake_llm: FakeOpenAI, said: str) -> Received:
    """The LLM request made for the caller's words `said`."""
    [received] = [r for r in fake_llm.received if r.messages and text_of(r.messages[-1].get("content")) == said]
    return received


def interrupted_text(shown: str, by: str) -> str:
    """The agent's words the terminal showed before the reply was interrupted `by` a line or Ctrl-C."""
    match = re.search(r"agent › (.*)\n +interrupted \(" + re.escape(by) + r"\) after (\d+) words", shown)
    assert match is not None, shown
    heard = match.group(1).strip()
    assert len(heard.split()) == int(match.group(2))
    return heard


# --- Tests ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_welcome_reply_latency_tool_status_and_session_end(
    server: ServerProcess, store_url: str, terminals: list[Terminal], tmp_path: Path
) -> None:
    conversation = new_conversation()
    term = chat(terminals, tmp_path, "--url", server.url, "--secret", SECRET, "--conversation-id", conversation)
    term.expect(f"agent › {WELCOME}")
    term.expect("first word ")
    term.prompt()
    term.say("Hello!")
    term.expect("agent › Sure, go ahead.")
    term.expect("total ")
    term.prompt()
    term.say("What time is it?")
    term.expect('data {"tool": "current_time", "status": "running"}')
    term.expect('data {"tool": "current_time", "status": "done"}')
    term.expect("It is noon.")
    term.prompt()
    term.child.sendeof()
    term.expect("Session ended")
    assert term.finish() == 0

    shown = term.shown
    assert f"conversation {conversation}" in shown
    # The reply streamed, then a latency line under it.
    assert re.search(r"agent › Sure, go ahead\.\n +first word \d+ ms · total \d+ ms\n", shown), shown
    assert re.search(r"It is noon\.\n +first word \d+ ms · total [\d.]+ m?s\n", shown), shown
    tool_turn = transcript(store_url, conversation)[-1]
    assert tool_turn[0] == "assistant" and tool_turn[1].endswith("It is noon.")
    assert transcript(store_url, conversation) == [
        ("assistant", WELCOME),
        ("user", "Hello!"),
        ("assistant", "Sure, go ahead."),
        ("user", "What time is it?"),
        tool_turn,
    ]
    rows = asyncio.run(stored(store_url, conversation))
    assert [(role, status) for role, status, _, _ in rows if role == "assistant"] == [
        ("assistant", "completed"),  # The welcome.
        ("assistant", "completed"),
        ("assistant", "completed"),
    ]


@pytest.mark.slow
def test_typing_during_a_reply_barges_in_with_what_was_shown(
    server: ServerProcess, store_url: str, fake_llm: FakeOpenAI, terminals: list[Terminal], tmp_path: Path
) -> None:
    conversation = new_conversation()
    term = chat(terminals, tmp_path, "--url", server.url, "--secret", SECRET, "--conversation-id", conversation)
    term.prompt()
    term.say("Tell me a long story.")
    term.expect("word5")
    term.say("Stop, please.")  # Typed while the story streams.
    term.expect("interrupted (you)")
    term.expect(f"{PROMPT}Stop, please.")
    term.expect("agent › Sure, go ahead.")
    term.prompt()
    term.child.sendeof()
    assert term.finish() == 0

    heard = interrupted_text(term.shown, "you")
    assert heard.startswith("word0 word1 word2 word3 word4 word5")
    assert len(heard.split()) < len(LONG_STORY)

    rows = asyncio.run(stored(store_url, conversation))
    assert [(role, status, text) for role, status, text, _ in rows[1:]] == [
        ("user", None, "Tell me a long story."),
        ("assistant", "interrupted", heard),
        ("user", None, "Stop, please."),
        ("assistant", "completed", "Sure, go ahead."),
    ]
    assert rows[2][3]["text_heard"] == heard
    assert rows[2][3]["text_sent"].startswith(heard)
    # The next LLM request saw exactly what was shown, marked as cut off.
    assert dialogue(request_after(fake_llm, "Stop, please."))[-2:] == [
        ("assistant", f"{heard} [interrupted]"),
        ("user", "Stop, please."),
    ]
    assert transcript(store_url, conversation) == [
        ("assistant", WELCOME),
        ("user", "Tell me a long story."),
        ("assistant", heard),
        ("user", "Stop, please."),
        ("assistant", "Sure, go ahead."),
    ]


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_then_ends_the_session_at_the_prompt(
    server: ServerProcess, store_url: str, fake_llm: FakeOpenAI, terminals: list[Terminal], tmp_path: Path
) -> None:
    conversation = new_conversation()
    term = chat(terminals, tmp_path, "--url", server.url, "--secret", SECRET, "--conversation-id", conversation)
    term.prompt()
    term.say("Tell me a long story.")
    term.expect("word5")
    term.child.sendintr()
    term.expect("interrupted (Ctrl-C)")
    term.prompt()  # Back at the prompt: nothing is sent until the next line.
    term.say("Go on.")
    term.expect("agent › Sure, go ahead.")
    term.prompt()
    term.child.sendintr()  # Ctrl-C at the prompt ends the session cleanly.
    term.expect("Session ended")
    assert term.finish() == 0

    heard = interrupted_text(term.shown, "Ctrl-C")
    assert heard.startswith("word0 word1 word2 word3 word4 word5")
    rows = asyncio.run(stored(store_url, conversation))
    assert [(role, status, text) for role, status, text, _ in rows[1:]] == [
        ("user", None, "Tell me a long story."),
        ("assistant", "interrupted", heard),
        ("user", None, "Go on."),
        ("assistant", "completed", "Sure, go ahead."),
    ]
    assert rows[2][3]["text_heard"] == heard
    assert dialogue(request_after(fake_llm, "Go on."))[-2:] == [
        ("assistant", f"{heard} [interrupted]"),
        ("user", "Go on."),
    ]
    assert [role for role, _ in transcript(store_url, conversation)] == [
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


@pytest.mark.slow
def test_piped_input_waits_for_each_reply(server: ServerProcess, store_url: str, tmp_path: Path) -> None:
    conversation = new_conversation()
    done = piped(
        tmp_path,
        ["--url", server.url, "--secret", SECRET, "--conversation-id", conversation],
        "Hello!\nWhat time is it?\n",
    )
    assert done.returncode == 0, done.stderr
    assert "interrupted" not in done.stdout
    assert f"{PROMPT}Hello!\n" in done.stdout
    assert "It is noon." in done.stdout
    assert "\x1b[" not in done.stdout  # No colour when not writing to a terminal.
    assert [text for _, text in transcript(store_url, conversation)][:3] == [WELCOME, "Hello!", "Sure, go ahead."]


def test_what_a_backend_sends_never_drives_the_terminal(odd_backend: str, tmp_path: Path) -> None:
    done = piped(tmp_path, ["--url", f"{odd_backend}/api/agent", "--secret", ODD_SECRET], "Hello \x1b[2J there\n")
    assert done.returncode == 0, done.stderr
    assert RAW_CONTROL.search(done.stdout) is None, repr(done.stdout)
    assert f"agent › {ODD_SHOWN}\n" in done.stdout, done.stdout
    assert r'data {"odd": "\u001b[2J\u202e"}' in done.stdout
    assert r"response.error: \x1b]0;owned\x07" in done.stdout
    assert f"{PROMPT}Hello \\x1b[2J there\n" in done.stdout  # even what was piped in is shown escaped


def test_an_error_body_never_drives_the_terminal(odd_backend: str, tmp_path: Path) -> None:
    done = piped(tmp_path, ["--url", f"{odd_backend}/refuse", "--secret", ODD_SECRET], "")
    assert done.returncode == 1
    assert RAW_CONTROL.search(done.stdout + done.stderr) is None, repr(done.stderr)
    assert r"401: invalid signature" in done.stderr and r"(\x1b]0;owned\x07bad \x9b2J)" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("way", "source"),
    [
        ("--secret-file", "--secret-file secret.txt"),
        ("--secret-file -", "standard input"),
        ("--secret -", "standard input"),
        ("environment", "LAYERCODE_WEBHOOK_SECRET"),
        (".env", "LAYERCODE_WEBHOOK_SECRET"),
    ],
)
def test_the_secret_can_stay_off_the_command_line(
    server: ServerProcess, store_url: str, tmp_path: Path, way: str, source: str
) -> None:
    conversation = new_conversation()
    args, env, said = ["--url", server.url, "--conversation-id", conversation], child_env(), "Hello!\n"
    if way == "--secret-file":
        (tmp_path / "secret.txt").write_text(f"{SECRET}\n")
        args += ["--secret-file", "secret.txt"]
    elif way.endswith(" -"):
        args += way.split()
        said = f"{SECRET}\n{said}"  # The first line is the secret, the rest the conversation.
    elif way == "environment":
        env["LAYERCODE_WEBHOOK_SECRET"] = SECRET
    else:
        (tmp_path / ".env").write_text(f"LAYERCODE_WEBHOOK_SECRET={SECRET}\n")
    done = piped(tmp_path, args, said, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"signed with {source}" in done.stdout
    assert SECRET not in done.stdout + done.stderr
    assert [text for _, text in transcript(store_url, conversation)] == [WELCOME, "Hello!", "Sure, go ahead."]


@pytest.mark.slow
def test_the_secret_can_be_typed_without_echo(
    server: ServerProcess, store_url: str, terminals: list[Terminal], tmp_path: Path
) -> None:
    conversation = new_conversation()
    term = chat(terminals, tmp_path, "--url", server.url, "--secret", "-", "--conversation-id", conversation)
    term.expect("Webhook secret: ")
    term.say(SECRET)
    term.expect(f"agent › {WELCOME}")
    term.prompt()
    term.child.sendeof()
    term.expect("Session ended")
    assert term.finish() == 0
    assert SECRET not in term.shown, "the terminal did not echo the secret"
    assert "signed with standard input" in term.shown
    assert [text for _, text in transcript(store_url, conversation)] == [WELCOME]


@pytest.mark.slow
def test_a_wrong_secret_is_one_clear_line(server: ServerProcess, terminals: list[Terminal], tmp_path: Path) -> None:
    term = chat(terminals, tmp_path, "--url", server.url, "--secret", "not-the-secret")
    term.expect("401: invalid signature – check --secret")
    assert term.finish() == 1
    assert "agent ›" not in term.shown


def test_an_unreachable_backend_is_one_clear_line(terminals: list[Terminal], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api/agent"
    term = chat(terminals, tmp_path, "--url", url, "--secret", SECRET)
    term.expect(f"cannot reach {url}: is `layercode-agent serve` running?")
    assert term.finish() == 1


def test_without_any_secret_it_explains_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # Away from any .env.
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "empty"))
    assert main(["chat"]) == 2
    assert "No webhook secret" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()
