from __future__ import annotations

import pytest

from layercode_agent.agent import VoiceTextCleaner, clean_text


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("**Hello** there! 😀 How are you?", "Hello there! How are you?"),
        ("# Title\n- one\n- two", "Title one two"),
        ("1. first\n2. second", "first second"),
        ("See [the docs](https://example.com) now.", "See the docs now."),
        ("It costs 42 dollars.", "It costs 42 dollars."),
        ("2024 was a good year", "2024 was a good year"),
        ("A well-known `thing`", "A well-known thing"),
        ("Thumbs up 👍🏽 and a flag 🇫🇷.", "Thumbs up and a flag ."),
        ("café au lait", "café au lait"),
        ("[laughs] Sure, I can do that.", "Sure, I can do that."),
        ("Rome, and the capital of [interrupted]", "Rome, and the capital of"),
        ("A [**bold** link](https://x.test/a_b) here", "A bold link here"),
        ("an unclosed [bracket at the end", "an unclosed bracket at the end"),
        ("[" + "long " * 20 + "text", ("long " * 20 + "text").strip()),
        ("line [one\ntwo] three", "line one two three"),
    ],
)
def test_clean_text(raw: str, spoken: str) -> None:
    assert clean_text(raw) == spoken


def test_first_word_is_not_held_back() -> None:
    cleaner = VoiceTextCleaner()
    assert cleaner.feed("Hello") == "Hello"
    assert cleaner.feed(" **wor") == " wor"
    assert cleaner.feed("ld**") == "ld"


def test_ambiguous_prefix_is_released_at_the_end() -> None:
    cleaner = VoiceTextCleaner()
    assert cleaner.feed("42") == ""
    assert cleaner.flush() == "42"


def test_a_stage_direction_is_held_until_its_bracket_closes() -> None:
    cleaner = VoiceTextCleaner()
    assert cleaner.feed("Well [sigh") == "Well "
    assert cleaner.feed("s] okay") == "okay"  # The space it leaves collapses into the one before.
    assert cleaner.flush() == ""
