"""`printable`: what the CLI prints of text it did not write itself."""

from __future__ import annotations

import json

import pytest

from layercode_agent.cli._printable import printable, printable_json

from .hostile import RAW_CONTROL


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain words, accents é, emoji 👍 and \\x1b typed", "plain words, accents é, emoji 👍 and \\x1b typed"),
        ("\x1b]0;title\x07", r"\x1b]0;title\x07"),
        ("\x1b[2J\x1b[H", r"\x1b[2J\x1b[H"),
        ("over\rwrite", r"over\rwrite"),
        ("two\nlines\tand a tab", r"two\nlines\tand a tab"),
        ("\x00\x7f", r"\x00\x7f"),
        ("\x9b31m \x85", r"\x9b31m \x85"),
        ("abc\u202edcba\u202c \u2066x\u2069 \u200f\u061c", r"abc\u202edcba\u202c \u2066x\u2069 \u200f\u061c"),
        ("line\u2028para\u2029", r"line\u2028para\u2029"),
        ("lone \ud800 surrogate", r"lone \ud800 surrogate"),
        ("[bold red]markup[/] :smile:", "[bold red]markup[/] :smile:"),
    ],
)
def test_control_characters_are_shown_as_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert RAW_CONTROL.search(printable(text)) is None
    assert "\n" not in printable(text) and "\t" not in printable(text)


def test_multiline_text_keeps_its_lines_and_tabs() -> None:
    assert printable("one\n\ttwo\r\n\x1b[2J", multiline=True) == "one\n\ttwo\\r\n\\x1b[2J"


def test_json_keeps_its_value() -> None:
    value = {"text": "\x1b]0;t\x07 \x7f \x9b \u202e \u2028 é 👍", "\u202ekey": ["\x85"]}
    document = printable_json(json.dumps(value, ensure_ascii=False, indent=2))
    assert RAW_CONTROL.search(document.replace("\n", "")) is None, document
    assert json.loads(document) == value
