r"""Text from callers, models and backends, made safe to print on the operator's terminal.

Why: what the CLI prints is mostly not its own. A caller's words, a model's reply, a turn id, a tool result
or an error body from someone else's backend can hold ESC sequences (OSC 0 retitles the window, CSI 2J
clears the screen, OSC 52 writes the clipboard, OSC 8 makes links), a lone CR that overwrites what came
before it, C1 controls that 8-bit terminals obey (U+009B is CSI), or bidirectional overrides that make a
line read differently from what it holds (CVE-2021-42574, "Trojan Source"). Rich strips a few of these
(BEL, BS, VT, FF, CR) and passes ESC through. Every place in the CLI that prints such text goes through
`printable` (or `printable_json` for `--json`), which shows each of those characters as its Python escape,
`\x1b`, `\r`, `\u202e`, so the operator sees that it is there and the terminal never acts on it.

Rich markup is the other half: text is always handed to Rich inside a `Text`, never as a markup string,
so `[bold]` or `[link=...]` in it is shown as typed.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["printable", "printable_json"]

_UNSAFE: Final = re.compile(
    "["
    "\x00-\x1f\x7f"  # C0 controls (ESC, CR, BEL, ...) and DEL
    "\x80-\x9f"  # C1 controls: CSI, OSC, NEL, ... in one character
    "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidirectional marks, embeddings, overrides, isolates
    "\u2028\u2029"  # line and paragraph separators, which some terminals break lines on
    "\ud800-\udfff"  # lone surrogates, which no terminal encoding can carry
    "]"
)
"""Every character `printable` shows as an escape."""

_NAMED: Final = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    if named := _NAMED.get(char):
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _escape_kept_lines(match: re.Match[str]) -> str:
    char = match.group()
    return char if char in "\n\t" else _escape(char)


def printable(text: str, *, multiline: bool = False) -> str:
    r"""`text` with every control, bidirectional or unencodable character shown as its Python escape.

    Args:
        text: Anything the CLI did not write itself.
        multiline: Keep newlines and tabs (a reply's paragraphs); by default they are escaped too, so an
            id or a table cell stays on one line.

    A backslash in `text` is left as it is, so `\x1b` typed by a caller looks like an escaped ESC; `--json`
    shows the exact text.
    """
    if multiline:
        return _UNSAFE.sub(_escape_kept_lines, text)
    return _UNSAFE.sub(lambda match: _escape(match.group()), text)


_UNSAFE_IN_JSON: Final = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
"""What JSON may hold raw inside a string but a terminal must not see (JSON escapes C0 itself)."""


def printable_json(document: str) -> str:
    r"""A JSON document with the characters `printable` escapes written as `\uXXXX`: the same value, safe to print.

    Such characters can only occur inside JSON strings, where `\uXXXX` stands for exactly that character,
    so `json.loads` of the result equals `json.loads(document)`.
    """
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", document)
