"""The pure decisions of the turn record: what the caller heard of a reply they barged into."""

from __future__ import annotations

import pytest
from pydantic_ai.messages import ModelResponse, TextPart

from layercode_agent.history import Heard, as_heard, turn_meta, what_was_heard

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
