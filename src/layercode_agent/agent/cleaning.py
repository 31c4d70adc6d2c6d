"""Remove markdown and emoji from streamed LLM text, without delaying the first word.

Models trained for chat write `**bold**`, `- bullets`, `# headings`, `[links](url)` and emoji even
when told not to, and voice-minded ones add stage directions such as `[laughs]` or copy the
`[interrupted]` mark from their history. A TTS engine reads all of those aloud ("asterisk
asterisk"). `VoiceTextCleaner` filters each delta as it arrives; it only holds back what depends on
what follows (bracketed text until its `]` says link or stage direction, digits at the start of a
line that may number a list), so plain text passes straight through.
"""

from __future__ import annotations

__all__ = ["VoiceTextCleaner", "clean_text"]

_EMOJI_RANGES = (
    (0x1F000, 0x1FAFF),  # pictographs, emoticons, transport, flags, symbols and pictographs extended
    (0x2600, 0x27BF),  # miscellaneous symbols, dingbats
    (0x2B00, 0x2BFF),  # arrows and stars
    (0x200D, 0x200D),  # zero-width joiner
    (0xFE0E, 0xFE0F),  # variation selectors
    (0x20E3, 0x20E3),  # combining keycap
)


def _is_emoji(char: str) -> bool:
    code = ord(char)
    return code >= 0x200D and any(low <= code <= high for low, high in _EMOJI_RANGES)


_DROP = frozenset("*_`#~|>")
_BULLETS = frozenset("-*+•")
_MAX_BRACKET = 60
"""Longer bracketed text is not a link label or a stage direction: it is spoken."""


class VoiceTextCleaner:
    """A streaming filter: `feed(delta)` returns what can be spoken now, `flush()` the rest at the end."""

    def __init__(self) -> None:
        self._line_start = True
        self._pending = ""  # characters held back until the next one decides their fate
        self._in_link_target = False
        self._last_emitted = " "
        self._bracket: str | None = None  # text after an unclosed "[", held until "]" decides
        self._label = ""  # a closed bracket's text, spoken only if "(" makes it a link

    def feed(self, delta: str) -> str:
        """Clean one delta; the result may be empty while an ambiguous prefix is held back."""
        out: list[str] = []
        for char in delta:
            self._step(char, out)
        return self._finish(out)

    def flush(self) -> str:
        """Return whatever is still held back, cleaned, at the end of the stream."""
        out: list[str] = []
        if self._bracket is not None:  # Never closed: it was ordinary text.
            self._release_bracket(out)
        pending, self._pending = self._pending, ""
        self._label = ""  # A bracket closing the stream was a stage direction.
        if pending and not pending.startswith("]"):
            # Digits at a line start that never became "1." are ordinary text.
            out.append(pending)
        return self._finish(out)

    def _release_bracket(self, out: list[str]) -> None:
        held, self._bracket = self._bracket or "", None
        for char in held:
            self._step(char, out, bracket_open=False)

    def _finish(self, out: list[str]) -> str:
        text = "".join(out)
        if text:
            self._last_emitted = text[-1]
        return text

    def _emit(self, text: str, out: list[str]) -> None:
        if not text:
            return
        if text == " " and (out[-1][-1:] if out else self._last_emitted) in (" ", ""):
            return  # collapse the spaces left where markup or newlines were removed
        out.append(text)

    def _step(self, char: str, out: list[str], *, bracket_open: bool = True) -> None:
        if self._in_link_target:
            if char == ")":
                self._in_link_target = False
            return
        if self._bracket is not None:
            if char == "]":
                self._label, self._bracket = self._bracket, None
                self._pending = "]"
                return
            if char not in "\r\n" and len(self._bracket) < _MAX_BRACKET:
                self._bracket += char
                return
            self._release_bracket(out)
        if self._pending:
            pending = self._pending
            if pending == "]":
                self._pending = ""
                label, self._label = self._label, ""
                if char == "(":
                    for held in label:  # "[label](url)": speak the label, skip the target.
                        self._step(held, out, bracket_open=False)
                    self._in_link_target = True
                    return
                # "[laughs]" or a copied "[interrupted]": a stage direction, never spoken.
            elif pending.isdigit():
                if char.isdigit():
                    self._pending += char
                    return
                if char in ".)":
                    self._pending = ""  # "1." or "1)" numbering a list item: drop it
                    self._line_start = True
                    return
                self._pending = ""
                self._line_start = False
                self._emit(pending, out)
            elif pending in _BULLETS:
                self._pending = ""
                if char == " ":
                    return  # a bullet marker: drop it and the space after it
                if pending != "*":
                    self._emit(pending, out)
        if _is_emoji(char):
            return
        if char in "\r\n":
            self._line_start = True
            self._emit(" ", out)
            return
        if self._line_start:
            if char in " \t":
                return
            if char in _BULLETS:
                self._pending = char
                self._line_start = False
                return
            if char.isdigit():
                self._pending = char
                return
            self._line_start = False
        if char == "[" and bracket_open:
            self._bracket = ""
            return
        if char in _DROP or char in "[]":
            return
        self._emit(char, out)


def clean_text(text: str) -> str:
    """Clean a whole text at once (for welcome messages, fillers and tests)."""
    cleaner = VoiceTextCleaner()
    return (cleaner.feed(text) + cleaner.flush()).strip()
