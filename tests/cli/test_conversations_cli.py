"""`layercode-agent conversations`, run on a SQLite database written beforehand through the real store."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic_ai.conversation import Conversation
from pydantic_ai.messages import ModelRequest, ModelResponse, ToolCallPart, ToolReturnPart

from layercode_agent.cli import conversations as conversations_cli
from layercode_agent.cli import main
from layercode_agent.conversations import ConversationDetail
from layercode_agent.stores import SQLiteStore

from ..test_conversations import reply, sample_messages, user
from .hostile import RAW_CONTROL

CONVERSATION = "lc_conv_0123456789abcdef"
OTHER = "lc_conv_other"


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store holding two conversations, configured through the environment as a user would."""
    path = tmp_path / "c.db"

    async def write() -> None:
        async with SQLiteStore(path) as store:
            await store.save(
                Conversation(conversation_id=OTHER, messages=[user("t1", "Hi"), reply("t1", "Hello.", "completed")])
            )
            await store.save(Conversation(conversation_id=CONVERSATION, messages=sample_messages()))
            await store.add_session_event(
                CONVERSATION,
                "session.update",
                {"type": "session.update", "recording_status": "completed", "recording_url": "https://rec/1.wav"},
                session_id="sess_1",
            )

    asyncio.run(write())
    # Away from any .env in the repository, with only the store configured.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVERSATION_STORE", f"sqlite:///{path}")
    return path


def stored(path: Path, conversation_id: str) -> bool:
    async def read() -> bool:
        async with SQLiteStore(path) as store:
            return await store.read_record(conversation_id) is not None

    return asyncio.run(read())


def test_list_shows_the_conversations_newest_first(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conversations", "list"]) == 0
    out = capsys.readouterr().out
    assert out.index(CONVERSATION) < out.index(OTHER)
    # Rich prints 80 columns when it is not writing to a terminal; the caller's words are cut to fit.
    assert "pending" in out and "Are you [" in out
    assert max(len(line) for line in out.splitlines()[:3]) <= 80
    assert f"2 most recent in SQLite at {database}" in out


def test_list_json_and_limit(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conversations", "list", "--json", "--limit", "1"]) == 0
    [summary] = json.loads(capsys.readouterr().out)
    assert summary["conversation_id"] == CONVERSATION
    assert (summary["turn_count"], summary["last_status"]) == (5, "pending")


def test_show_prints_the_transcript_turn_by_turn(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conversations", "show", CONVERSATION]) == 0
    out = capsys.readouterr().out
    for expected in [
        "Welcome aboard.",
        "welcome",
        "What's the weather in Paris?",
        'get_weather({"city":"Paris"}) -> sunny, 21 C',
        "It is sunny in Paris.",
        "interrupted",
        "heard   Once upon a time",
        "sent    Once upon a time, in a land far away,",
        "failed",
        "Are you [still] there?",
        "pending",
        "(still replying)",
        "session.update",
        "Recording: completed https://rec/1.wav",
    ]:
        assert expected in out, expected
    assert out.index("What's the weather") < out.index("Tell me a long story") < out.index("What time is it?")


def test_show_json_is_the_conversation_detail(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conversations", "show", CONVERSATION, "--json"]) == 0
    detail = ConversationDetail.model_validate_json(capsys.readouterr().out)
    assert [turn.status for turn in detail.turns] == ["completed", "completed", "interrupted", "failed", "pending"]
    assert detail.recording_url == "https://rec/1.wav"


def test_unknown_id_exits_1_naming_the_store(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conversations", "show", "lc_conv_nobody"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "lc_conv_nobody" in captured.err and f"SQLite at {database}" in captured.err
    assert main(["conversations", "delete", "lc_conv_nobody", "--yes"]) == 1
    assert "lc_conv_nobody" in capsys.readouterr().err


def test_delete_yes_removes_it(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conversations", "delete", CONVERSATION, "--yes"]) == 0
    assert f"Deleted conversation {CONVERSATION!r}" in capsys.readouterr().out
    assert not stored(database, CONVERSATION) and stored(database, OTHER)
    assert main(["conversations", "show", CONVERSATION]) == 1
    assert CONVERSATION in capsys.readouterr().err


def test_delete_without_yes_or_a_terminal_refuses(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # pytest's stdin is not a terminal, like a cron job's or a pipe's.
    assert main(["conversations", "delete", CONVERSATION]) == 1
    assert "--yes" in capsys.readouterr().err
    assert stored(database, CONVERSATION)


@pytest.mark.parametrize(("answer", "code", "kept"), [("y\n", 0, False), ("n\n", 1, True)])
def test_delete_asks_on_a_terminal(
    database: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
    code: int,
    kept: bool,
) -> None:
    monkeypatch.setattr(conversations_cli, "_can_ask", lambda: True)
    monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
    assert main(["conversations", "delete", CONVERSATION]) == code
    assert f"Delete conversation {CONVERSATION!r} (5 turns, 1 session events)" in capsys.readouterr().out
    assert stored(database, CONVERSATION) is kept


def test_store_errors_are_one_line_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVERSATION_STORE", "bogus://somewhere")
    assert main(["conversations", "list"]) == 1
    err = capsys.readouterr().err
    assert "Conversation store error" in err and "bogus" in err
    assert "Traceback" not in err


def test_a_missing_database_is_reported_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVERSATION_STORE", "sqlite:///data/none.db")
    assert main(["conversations", "list"]) == 0
    assert "No conversations in data/none.db" in capsys.readouterr().out
    assert main(["conversations", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["conversations", "show", "lc_conv_x"]) == 1
    assert "lc_conv_x" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_memory_store_cannot_be_read_from_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVERSATION_STORE", "memory://")
    assert main(["conversations", "list"]) == 1
    assert "/api/conversations" in capsys.readouterr().err


def test_the_cli_starts_without_loading_the_store_or_pydantic_ai() -> None:
    code = (
        "import sys, layercode_agent.cli\n"
        "print(sorted(name for name in ('pydantic_ai', 'sqlite3', 'fastapi') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- Caller text never drives the terminal ------------------------------------------------------------

# What a caller (or a model it talked into it) can put in stored text: OSC 0 sets the window title, CSI 2J
# clears the screen, a lone CR overwrites what is before it, U+009B is the one-byte CSI of 8-bit terminals,
# U+202E reverses the rest of the line (Trojan Source), DEL and NUL, and Rich markup.
TITLE, TITLE_SHOWN = "\x1b]0;x\x07", r"\x1b]0;x\x07"
CLEAR, CLEAR_SHOWN = "\x1b[2J", r"\x1b[2J"
HOSTILE_TEXT = f"{TITLE}hi{CLEAR}\r\x9b1m\u202eab\x7f\x00[red]x[/]"
HOSTILE_SHOWN = rf"{TITLE_SHOWN}hi{CLEAR_SHOWN}\r\x9b1m\u202eab\x7f\x00[red]x[/]"
HOSTILE_ID, HOSTILE_ID_SHOWN = f"c\n{CLEAR}", rf"c\n{CLEAR_SHOWN}"


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store whose every caller-controlled field carries terminal escapes."""
    path = tmp_path / "hostile.db"
    tool = {"turn_id": f"turn{CLEAR}", "role": "tool"}
    messages = [
        user(f"turn{CLEAR}", HOSTILE_TEXT),
        ModelResponse(parts=[ToolCallPart(f"tool{TITLE}", {"city": "x"}, tool_call_id="call_1")], metadata=tool),
        ModelRequest(parts=[ToolReturnPart(f"tool{TITLE}", f"result{CLEAR}", tool_call_id="call_1")], metadata=tool),
        reply(f"turn{CLEAR}", f"reply {HOSTILE_TEXT}\nsecond line", "completed"),
        user("turn_2", "heard?"),
        reply(
            "turn_2",
            f"heard {HOSTILE_TEXT}",
            "interrupted",
            text_sent=f"sent {HOSTILE_TEXT}",
            text_heard=f"heard {HOSTILE_TEXT}",
        ),
        user("turn_3", f"{TITLE}\n[b]hi"),
    ]

    async def write() -> None:
        async with SQLiteStore(path) as store:
            await store.save(Conversation(conversation_id=HOSTILE_ID, messages=messages))
            await store.add_session_event(
                HOSTILE_ID,
                "session.update",
                {"type": "session.update", "recording_status": f"done{CLEAR}", "recording_url": f"https://x/{TITLE}"},
                session_id=f"sess{TITLE}",
            )

    asyncio.run(write())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVERSATION_STORE", f"sqlite:///{path}")
    return path


def test_show_escapes_control_characters_and_markup(hostile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conversations", "show", HOSTILE_ID]) == 0
    out = capsys.readouterr().out
    assert RAW_CONTROL.search(out) is None, repr(out)
    for expected in [
        f"Conversation {HOSTILE_ID_SHOWN}",
        f"turn{CLEAR_SHOWN}",
        f"caller  {HOSTILE_SHOWN}",  # the markup in the caller's words shows as typed
        f"tool{TITLE_SHOWN}(",
        f"-> result{CLEAR_SHOWN}",
        f"reply {HOSTILE_SHOWN}",
        f"heard   heard {HOSTILE_SHOWN}",
        f"sent    sent {HOSTILE_SHOWN}",
        f"sess{TITLE_SHOWN}",
        f"Recording: done{CLEAR_SHOWN} https://x/{TITLE_SHOWN}",
        "[b]hi",
    ]:
        assert expected in out, (expected, out)
    # A reply's own lines stay lines; only ids and other one-line fields show a newline as \n.
    assert f"reply {HOSTILE_SHOWN}\n" in out and "second line" in out


def test_list_escapes_control_characters(hostile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conversations", "list"]) == 0
    out = capsys.readouterr().out
    assert RAW_CONTROL.search(out) is None, repr(out)
    assert HOSTILE_ID_SHOWN in out and f"{TITLE_SHOWN} [b]hi" in out
    assert len(out.splitlines()) == 3, out  # the header, one line for the conversation, the footer


@pytest.mark.parametrize("command", [["list", "--json"], ["show", HOSTILE_ID, "--json"]])
def test_json_escapes_control_characters_and_keeps_the_text(
    hostile: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    assert main(["conversations", *command]) == 0
    out = capsys.readouterr().out
    assert RAW_CONTROL.search(out) is None, repr(out)
    # JSON's own \u escapes: the value read back is exactly what was stored.
    value = json.loads(out)
    if command[0] == "list":
        assert value[0]["conversation_id"] == HOSTILE_ID
    else:
        detail = ConversationDetail.model_validate(value)
        assert detail.conversation_id == HOSTILE_ID
        assert detail.turns[0].user_text == HOSTILE_TEXT
        assert detail.turns[1].text_heard == f"heard {HOSTILE_TEXT}"


def test_messages_about_an_id_escape_it(hostile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conversations", "show", f"x{TITLE}"]) == 1
    assert main(["conversations", "delete", f"x{TITLE}", "--yes"]) == 1
    assert main(["conversations", "delete", HOSTILE_ID]) == 1  # no terminal to confirm on
    assert main(["conversations", "delete", HOSTILE_ID, "--yes"]) == 0
    captured = capsys.readouterr()
    assert RAW_CONTROL.search(captured.out + captured.err) is None, repr(captured)
    assert f"x{TITLE_SHOWN}" in captured.err and HOSTILE_ID_SHOWN in captured.out
