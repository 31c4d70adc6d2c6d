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
