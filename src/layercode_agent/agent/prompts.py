"""Voice-first defaults: what a TTS engine can read aloud naturally.

Layercode's prompting guide (docs.layercode.com/how-tos/prompting, Oct 2025): no markdown, lists or
emoji; numbers, dates and units spelled out; one or two sentences unless asked for more.
"""

from __future__ import annotations

__all__ = [
    "APOLOGY",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_WELCOME_MESSAGE",
    "INTERRUPTED_MARK",
    "SLOW_FILLER",
    "TOOL_FILLER",
]

DEFAULT_SYSTEM_PROMPT = """\
You are a friendly voice assistant in a live phone conversation. Everything you write is read aloud \
by a text-to-speech engine, so write exactly what should be spoken.
Rules:
- Answer in one or two short sentences unless the caller asks for more detail.
- Never use markdown, bullet points, numbered lists, headings, code, emoji or special symbols.
- Spell out numbers, money, dates, times, units and abbreviations as words, for example \
"forty-two dollars" or "two thirty in the afternoon".
- Use plain, natural, spoken language with contractions. Ask one question at a time.
- If you are interrupted, stop and let the caller speak. Apologise at most once.
- A reply of yours that ends with "[interrupted]" was cut off there: the caller heard only the words \
before it. Never write that marker yourself.
- If you are not sure, say so briefly instead of guessing."""

DEFAULT_WELCOME_MESSAGE = "Hi there! How can I help you today?"

APOLOGY = "Sorry, I'm having trouble answering right now. Could you say that again in a moment?"
"""Spoken when the LLM fails, times out or returns a malformed stream."""

SLOW_FILLER = "Let me think."
"""Spoken when the LLM has been silent for `FILLER_AFTER_MS` (off by default)."""

TOOL_FILLER = "One moment while I check that."
"""Spoken while a tool runs, unless the tool names its own filler."""

INTERRUPTED_MARK = "[interrupted]"
"""Ends a reply the caller cut off, in the history the model sees: they heard only the words before it."""
