"""The pure decisions of the turn record: what the caller heard, and how beginning and closing a turn change the log."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic_ai.conversation_store import ConversationRecord
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.usage import RunUsage

from layercode_agent.history import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    LOST,
    PENDING,
    Busy,
    Duplicate,
    Heard,
    ReplyState,
    Started,
    TakeOver,
    Unclosed,
    as_heard,
    closing_messages,
    decide_begin,
    decide_close,
    is_placeholder,
    llm_messages,
    reply_text,
    result_messages,
    stored_as,
    turn_meta,
    unmarked,
    what_was_heard,
    with_filler,
)
from layercode_agent.protocol import InterruptionContext

SENT = "One, two, three, four."


@pytest.mark.parametrize(
    ("sent", "text_heard", "words_heard", "expected"),
    [
        # Layercode's text is a prefix of what was sent: it is what the caller heard.
        ("w0 w1 w2 w3", "w0 w1", 2, Heard("w0 w1")),
        (SENT, "One, two,", None, Heard("One, two,")),
        ("Hello there", "Hel", None, Heard("Hel")),  # Cut mid-word.
        (SENT, SENT, None, Heard(SENT)),
        (SENT, "", 0, Heard("")),  # Heard nothing at all.
        # Whitespace does not count: spaces, tabs and line breaks, leading, trailing or doubled.
        ("One,  two,\nthree.", " One, two, three", None, Heard("One, two, three")),
        ("One, two, three.", "One,\ttwo,  ", 2, Heard("One, two,")),
        # A prefix wins over a word count that disagrees with it.
        (SENT, "One, two,", 3, Heard("One, two,")),
        # Anything else is refused: what was sent is kept, cut to `words_heard` when Layercode gave it.
        (SENT, "Buy now at evil.example", 2, Heard("One, two,", refused="not a prefix")),
        (SENT, "Buy now at evil.example", None, Heard(None, refused="not a prefix")),
        (SENT, "one, two,", 2, Heard("One, two,", refused="not a prefix")),  # Case counts.
        (SENT, "One two", 2, Heard("One, two,", refused="not a prefix")),  # So does punctuation.
        ("One two", "One two three", 3, Heard("One two", refused="not a prefix")),  # Longer than sent.
        (SENT, "Nope", 0, Heard("", refused="not a prefix")),
        (SENT, "Nope", -3, Heard("", refused="not a prefix")),
        (SENT, "Nope", 99, Heard("One, two, three, four.", refused="not a prefix")),
        # No text from Layercode: the word count if given, else the reply as stored.
        (SENT, None, 2, Heard("One, two,")),
        ("One,\n two,  three", None, 2, Heard("One, two,")),
        (SENT, None, None, Heard(None)),
    ],
)
def test_what_was_heard(sent: str, text_heard: str | None, words_heard: int | None, expected: Heard) -> None:
    heard = what_was_heard(sent, text_heard, words_heard)
    assert heard.text == expected.text
    if expected.refused is None:
        assert heard.refused is None
    else:
        assert heard.refused is not None and expected.refused in heard.refused
        assert text_heard is None or text_heard.strip() not in heard.refused, "the log line must not quote the caller"


def reply(text: str, **meta: str) -> ModelResponse:
    return ModelResponse(parts=[TextPart(text)], metadata=turn_meta("t1", "assistant", "completed", **meta))


@pytest.mark.parametrize(
    ("message", "heard", "text", "text_sent"),
    [
        (reply(SENT), "One, two,", "One, two,", SENT),
        (reply(SENT), "", "", SENT),
        (reply(SENT), None, SENT, None),  # Marked interrupted, its text kept, no text_sent/heard added.
        # Interrupted twice: the first rewrite's text_sent stays what was sent.
        (reply("One, two,", text_sent=SENT, text_heard="One, two,"), "One,", "One,", SENT),
    ],
)
def test_as_heard_rewrites_a_reply_and_marks_it_interrupted(
    message: ModelResponse, heard: str | None, text: str, text_sent: str | None
) -> None:
    rewritten = as_heard(message, heard)
    assert isinstance(rewritten, ModelResponse)
    meta = rewritten.metadata or {}
    assert meta["status"] == "interrupted" and meta["turn_id"] == "t1"
    assert "".join(part.content for part in rewritten.parts if isinstance(part, TextPart)) == text
    assert meta.get("text_sent") == text_sent
    if heard is not None:
        assert meta["text_heard"] == heard
    assert (message.metadata or {})["status"] == "completed", "the original is not changed in place"


# --- The record decisions of a turn, as tables -----------------------------------------------------

ME = "worker-a"


def user(turn_id: str, text: str = "hi", delivery: str | None = None) -> ModelRequest:
    return ModelRequest(parts=[UserPromptPart(text)], metadata=turn_meta(turn_id, "user", delivery=delivery))


def answer(turn_id: str, text: str, status: str = COMPLETED, **meta: Any) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart(text)] if text else [], metadata=turn_meta(turn_id, "assistant", status, **meta)
    )


def placeholder(turn_id: str, owner: str = ME) -> ModelResponse:
    return ModelResponse(parts=[], metadata=turn_meta(turn_id, "assistant", PENDING, owner=owner))


def summary(messages: list[ModelMessage]) -> list[tuple[str, str | None, str | None, str]]:
    """Each message as (kind, role, status, text): what a record decision is judged by."""
    out: list[tuple[str, str | None, str | None, str]] = []
    for message in messages:
        meta = message.metadata or {}
        if isinstance(message, ModelResponse):
            out.append(("response", meta.get("role"), meta.get("status"), reply_text(message)))
        else:
            texts = [part.content for part in message.parts if isinstance(part, UserPromptPart)]
            out.append(("request", meta.get("role"), meta.get("status"), "".join(str(text) for text in texts)))
    return out


NEW = [user("t2", "next"), placeholder("t2")]
NEW_SUMMARY = [("request", "user", None, "next"), ("response", "assistant", PENDING, "")]
EARLIER = [user("t0", "first"), answer("t0", "Hello.")]
OPEN = [user("t1", "question"), placeholder("t1", owner="worker-b")]
BARGED = InterruptionContext(previous_turn_interrupted=True, text_heard="One, two,", assistant_turn_id="t1")
KEPT = Unclosed("t1", [answer("t1", "One, two, three, four.")], RunUsage(requests=1, input_tokens=10))


@pytest.mark.parametrize(
    ("log", "delivery", "interruption", "take_over", "expected", "keep", "added"),
    [
        # A repeat of a turn the log holds changes nothing, whatever else is going on.
        ([*EARLIER, user("t2"), answer("t2", "Done.")], None, None, None, Duplicate(), None, []),
        ([*EARLIER, user("other", delivery="d1")], "d1", BARGED, None, Duplicate(), None, []),
        # A new conversation, or one whose last turn is closed: the new messages are appended.
        ([], None, None, None, Started, 0, NEW_SUMMARY),
        (EARLIER, None, None, None, Started, 2, NEW_SUMMARY),
        # Another turn is open and nobody is taking it over: busy, naming it and its worker.
        ([*EARLIER, *OPEN], None, None, None, Busy("t1", "worker-b"), None, []),
        ([*EARLIER, *OPEN], None, None, TakeOver("some-other-turn"), Busy("t1", "worker-b"), None, []),
        # Taken over without knowing what was sent: closed as lost, empty.
        (
            [*EARLIER, *OPEN],
            None,
            None,
            TakeOver("t1"),
            Started,
            3,
            [("response", "assistant", LOST, ""), *NEW_SUMMARY],
        ),
        # Taken over by the worker that streamed it: closed as lost with what it sent...
        (
            [*EARLIER, *OPEN],
            None,
            None,
            TakeOver("t1", sent="One, two, three"),
            Started,
            3,
            [("response", "assistant", LOST, "One, two, three"), *NEW_SUMMARY],
        ),
        # ...cut to what the caller heard when Layercode says so...
        (
            [*EARLIER, *OPEN],
            None,
            BARGED,
            TakeOver("t1", sent="One, two, three"),
            Started,
            3,
            [("response", "assistant", LOST, "One, two,"), *NEW_SUMMARY],
        ),
        # ...and, knowing nothing sent, what Layercode says was heard is all there is.
        (
            [*EARLIER, *OPEN],
            None,
            BARGED,
            TakeOver("t1"),
            Started,
            3,
            [("response", "assistant", LOST, "One, two,"), *NEW_SUMMARY],
        ),
        # This worker's reply the store did not take: stored now, as heard if the caller barged in.
        (
            [*EARLIER, *OPEN],
            None,
            None,
            TakeOver("t1", kept=KEPT),
            Started,
            3,
            [("response", "assistant", COMPLETED, "One, two, three, four."), *NEW_SUMMARY],
        ),
        (
            [*EARLIER, *OPEN],
            None,
            BARGED,
            TakeOver("t1", kept=KEPT),
            Started,
            3,
            [("response", "assistant", INTERRUPTED, "One, two,"), *NEW_SUMMARY],
        ),
        # A closed reply the caller barged into becomes what they heard.
        (
            [user("t1"), answer("t1", "One, two, three.")],
            None,
            BARGED,
            None,
            Started,
            1,
            [("response", "assistant", INTERRUPTED, "One, two,"), *NEW_SUMMARY],
        ),
        # Not when Layercode speaks of another turn, or says nothing was interrupted.
        (
            [user("t0"), answer("t0", "One, two, three.")],
            None,
            BARGED,
            None,
            Started,
            2,
            NEW_SUMMARY,
        ),
        (
            [user("t1"), answer("t1", "One, two, three.")],
            None,
            InterruptionContext(previous_turn_interrupted=False, text_heard="One,", assistant_turn_id="t1"),
            None,
            Started,
            2,
            NEW_SUMMARY,
        ),
        # A text that is not a prefix of what was sent is refused; the word count stands in.
        (
            [user("t1"), answer("t1", "One, two, three.")],
            None,
            InterruptionContext(previous_turn_interrupted=True, text_heard="Buy now", words_heard=1),
            None,
            Started,
            1,
            [("response", "assistant", INTERRUPTED, "One,"), *NEW_SUMMARY],
        ),
    ],
)
def test_decide_begin(
    log: list[ModelMessage],
    delivery: str | None,
    interruption: InterruptionContext | None,
    take_over: TakeOver | None,
    expected: object,
    keep: int | None,
    added: list[tuple[str, str | None, str | None, str]],
) -> None:
    change = decide_begin(
        log,
        None,
        turn_id="t2",
        delivery=delivery,
        new_messages=NEW,
        interruption=interruption,
        take_over=take_over,
        spoken=lambda text: text,
    )
    if isinstance(expected, type):
        assert isinstance(change.result, expected)
    else:
        assert change.result == expected
    assert change.keep == keep
    assert summary(change.add) == added
    if isinstance(change.result, Started):
        assert change.keep is not None
        assert change.result.messages == [*log[: change.keep], *change.add]
        assert (change.result.refused is not None) == (
            interruption is not None and interruption.text_heard == "Buy now"
        )


def test_decide_begin_compares_what_was_heard_with_the_reply_as_spoken() -> None:
    """Layercode reports the spoken text, which the voice cleaner made of what the model wrote."""
    log = [user("t1"), answer("t1", "**One**, two, three.")]
    barged = InterruptionContext(previous_turn_interrupted=True, text_heard="One, two,")
    as_written = decide_begin(
        log, None, turn_id="t2", delivery=None, new_messages=NEW, interruption=barged, take_over=None, spoken=str
    )
    as_spoken = decide_begin(
        log,
        None,
        turn_id="t2",
        delivery=None,
        new_messages=NEW,
        interruption=barged,
        take_over=None,
        spoken=lambda text: text.replace("*", ""),
    )
    assert isinstance(as_written.result, Started) and as_written.result.refused is not None
    assert isinstance(as_spoken.result, Started) and as_spoken.result.refused is None
    assert summary(as_spoken.add)[0] == ("response", "assistant", INTERRUPTED, "One, two,")
    assert (as_spoken.add[0].metadata or {})["text_sent"] == "**One**, two, three."


def test_decide_begin_adds_a_recovered_replys_usage_to_the_conversations() -> None:
    record = ConversationRecord(conversation_id="c", head_id=None, usage=RunUsage(requests=3, input_tokens=100))
    change = decide_begin(
        [*EARLIER, *OPEN],
        record,
        turn_id="t2",
        delivery=None,
        new_messages=NEW,
        interruption=None,
        take_over=TakeOver("t1", kept=KEPT),
        spoken=str,
    )
    assert isinstance(change.result, Started) and change.result.recovered is KEPT
    assert change.usage == RunUsage(requests=4, input_tokens=110)


CLOSING: list[ModelMessage] = [answer("t1", "All done.")]


@pytest.mark.parametrize(
    ("log", "usage", "closed", "keep", "total"),
    [
        # Our placeholder: replaced by the reply (what followed it stays), usage added to the total.
        ([*EARLIER, user("t1"), placeholder("t1")], RunUsage(requests=1), True, 3, RunUsage(requests=3)),
        ([user("t1"), placeholder("t1"), user("t2")], None, True, 1, None),
        # Another worker's placeholder, or one already closed otherwise: not ours to close.
        ([user("t1"), placeholder("t1", owner="worker-b")], RunUsage(requests=1), False, None, None),
        ([user("t1"), answer("t1", "One,", LOST)], RunUsage(requests=1), False, None, None),
        ([user("t0"), answer("t0", "Other.")], RunUsage(requests=1), False, None, None),
        # Already stored as this close: a write the store took though it reported a failure.
        ([user("t1"), answer("t1", "All done.")], RunUsage(requests=1), True, None, None),
    ],
)
def test_decide_close(
    log: list[ModelMessage], usage: RunUsage | None, closed: bool, keep: int | None, total: RunUsage | None
) -> None:
    record = ConversationRecord(conversation_id="c", head_id=None, usage=RunUsage(requests=2))
    change = decide_close(log, record, turn_id="t1", owner=ME, closing=CLOSING, usage=usage)
    assert change.result is closed
    assert change.keep == keep
    assert change.usage == total
    if keep is not None:
        assert change.add == [*CLOSING, *log[keep + 1 :]]


CALL = ToolCallPart("lookup", {"q": "x"}, tool_call_id="c1")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (answer("t1", "Here it is."), ["Well, Here it is."]),
        (ModelResponse(parts=[CALL, TextPart("Found.")]), [CALL, "Well, Found."]),
        (ModelResponse(parts=[CALL]), ["Well,", CALL]),  # No text yet: the filler becomes the text.
        (answer("t1", ""), ["Well,"]),
    ],
)
def test_with_filler(message: ModelResponse, expected: list[object]) -> None:
    filled = with_filler(message, "Well, ")
    assert isinstance(filled, ModelResponse)
    assert [part.content if isinstance(part, TextPart) else part for part in filled.parts] == expected
    assert filled.metadata == message.metadata


def test_with_filler_leaves_requests_alone() -> None:
    request = user("t1")
    assert with_filler(request, "Well, ") is request


@pytest.mark.parametrize(
    ("content", "mark", "expected"),
    [
        ("All of it.", "[interrupted]", "All of it."),
        ("Cut off [interrupted]", "[interrupted]", "Cut off"),
        ("One [interrupted] two  [interrupted]", "[interrupted]", "One two"),
        ("Kept [interrupted] as is", "", "Kept [interrupted] as is"),
    ],
)
def test_unmarked(content: str, mark: str, expected: str) -> None:
    part = unmarked(TextPart(content), mark)
    assert isinstance(part, TextPart) and part.content == expected
    assert unmarked(CALL, mark) is CALL


RETURN = ToolReturnPart("lookup", "42", tool_call_id="c1")


@pytest.mark.parametrize(
    ("messages", "mark", "expected"),
    [
        # Tool traffic, then the reply, which loses a copied interruption mark.
        (
            [ModelResponse(parts=[CALL]), ModelRequest(parts=[RETURN]), ModelResponse(parts=[TextPart("42 [cut]")])],
            "[cut]",
            [("tool", None, None), ("tool", None, None), ("assistant", COMPLETED, "42")],
        ),
        ([ModelResponse(parts=[TextPart("Hi [cut]")])], "", [("assistant", COMPLETED, "Hi [cut]")]),
        # A run that ends on a request has no reply: all of it is tool traffic.
        ([ModelResponse(parts=[CALL]), ModelRequest(parts=[RETURN])], "[cut]", [("tool", None, None)] * 2),
    ],
)
def test_result_messages(
    messages: list[ModelMessage], mark: str, expected: list[tuple[str, str | None, str | None]]
) -> None:
    marked = result_messages(messages, "t1", mark)
    got: list[tuple[str, str | None, str | None]] = []
    for message in marked:
        meta = message.metadata or {}
        assert meta["turn_id"] == "t1"
        text = reply_text(message) if meta["role"] == "assistant" and isinstance(message, ModelResponse) else None
        got.append((meta["role"], meta.get("status"), text))
    assert got == expected


@pytest.mark.parametrize(
    ("calls", "text", "status", "expected"),
    [
        ([], "", INTERRUPTED, [("response", "assistant", INTERRUPTED, "")]),
        ([], "Sorry.", FAILED, [("response", "assistant", FAILED, "Sorry.")]),
        (
            [(CALL, RETURN)],
            "So far",
            INTERRUPTED,
            [
                ("response", "tool", None, ""),
                ("request", "tool", None, ""),
                ("response", "assistant", INTERRUPTED, "So far"),
            ],
        ),
    ],
)
def test_closing_messages_keep_only_tool_calls_that_returned(
    calls: list[tuple[ToolCallPart, ToolReturnPart]],
    text: str,
    status: str,
    expected: list[tuple[str, str | None, str | None, str]],
) -> None:
    messages = closing_messages("t1", calls, text, status)
    assert summary(messages) == expected
    if calls:
        assert messages[0].parts == [CALL] and messages[1].parts == [RETURN]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [([], False), ([user("t1")], False), ([user("t1"), placeholder("t1")], True), (EARLIER, False)],
)
def test_is_placeholder(messages: list[ModelMessage], expected: bool) -> None:
    assert is_placeholder(messages) is expected


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (ReplyState(0, "t1", COMPLETED, None, "All done."), True),
        (ReplyState(0, "t1", COMPLETED, None, "All"), False),
        (ReplyState(0, "t1", INTERRUPTED, None, "All done."), False),
    ],
)
def test_stored_as(stored: ReplyState, expected: bool) -> None:
    assert stored_as(stored, CLOSING) is expected


# --- The model's view of the log --------------------------------------------------------------------


def test_the_model_gets_its_own_copy_of_the_requests_it_may_change() -> None:
    # The log's messages may be the store's cached objects; pydantic-ai fills in the requests that end the
    # history it is given, in place (run id, timestamp, its metadata namespace): they must not be the log's.
    earlier = ModelRequest(parts=[UserPromptPart("before")], metadata=turn_meta("t1", "user"))
    reply = ModelResponse(parts=[TextPart("answer")], metadata=turn_meta("t1", "assistant", COMPLETED))
    tool_result = ModelRequest(
        parts=[ToolReturnPart("lookup", "found", tool_call_id="c1")], metadata=turn_meta("t2", "tool")
    )
    asked = ModelRequest(parts=[UserPromptPart("now")], metadata=turn_meta("t2", "user", nested={"kept": 1}))
    log: list[ModelMessage] = [earlier, reply, tool_result, asked]

    view = llm_messages(log, "[interrupted]")

    assert view == log
    assert view[0] is earlier and view[1] is reply  # Only read: shared.
    for copied, original in zip(view[2:], log[2:], strict=True):
        assert isinstance(copied, ModelRequest) and copied is not original
        copied.run_id = "run-1"
        copied.parts = [*copied.parts, UserPromptPart("added")]
        assert copied.metadata is not None
        copied.metadata["turn_id"] = "changed"
        copied.metadata.setdefault("nested", {})["kept"] = 2
        copied.metadata["pydantic_ai"] = {"state": 1}
    assert log == [earlier, reply, tool_result, asked]
    assert asked.run_id is None and len(asked.parts) == 1
    assert asked.metadata == turn_meta("t2", "user", nested={"kept": 1})
    assert tool_result.metadata == turn_meta("t2", "tool")
