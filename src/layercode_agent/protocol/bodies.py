r"""JSON request bodies, decoded once and the same way for every route that reads one.

Why one decoder: each route that once called ``json.loads`` itself failed differently on the same bad input (a
``RecursionError`` is not a ``ValueError``, so JSON nested too deeply was a 500 on some routes and a 400 on others),
and text that is not Unicode got past all of them. :func:`load_json_object` refuses, with a
:class:`~layercode_agent.protocol.MalformedPayloadError` (400) saying what is wrong and where:

- bytes that are not UTF-8, an empty body, text that is not JSON, JSON that is not an object;
- arrays and objects nested deeper than :data:`MAX_JSON_DEPTH`. The decoder itself gives up near the interpreter's
  recursion limit (about 1000 levels), and a value it could still read would fail the next encoder that meets it
  deeper in the stack (a store writing it, a log, a reply): refusing at the door keeps that a 400;
- a **lone UTF-16 surrogate** anywhere, in any string value or object key at any depth (``"\ud800"``, a ``\u``
  escape of half a surrogate pair). It is valid JSON but not Unicode text: it has no UTF-8 encoding, so nothing
  downstream can store, log or stream it (it once broke the reply stream when it was in ``turn_id``, and gave a 500
  when it was in a ``conversation_id`` or a transcript).

Why a 400 rather than replacing such characters with U+FFFD: replacing would change what the signed body says,
silently, and it would merge distinct ids (``"a\ud800"`` and ``"a\udbff"`` would both become ``"a\ufffd"``, one
conversation). No correct sender produces a lone surrogate (``JSON.stringify`` of well-formed text never does); one
that cut a string inside a surrogate pair gets a 400 naming the field, which it can fix. A surrogate *pair*
(``"\ud83d\ude00"``) is one ordinary character and is accepted.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from .errors import MalformedPayloadError

__all__ = ["MAX_JSON_DEPTH", "load_json_object"]

MAX_JSON_DEPTH: Final = 64
"""Deepest nesting of arrays and objects accepted in a body; the body object itself is level 1."""

_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_SURROGATE_PROBLEM: Final = "a lone surrogate (half of a UTF-16 pair), which is not Unicode text"
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_JSON_TYPE_NAMES: Final[dict[type, str]] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def load_json_object(raw: bytes | str) -> dict[str, Any]:
    """Decode a request body that must be a JSON object.

    Args:
        raw: The body as received (bytes), or text already decoded.

    Returns:
        The object, every string in it Unicode text and its nesting at most :data:`MAX_JSON_DEPTH` deep.

    Raises:
        MalformedPayloadError: Not UTF-8, empty, not JSON, not an object, nested too deeply, or a string holds a
            lone surrogate; the message says which, and names the field for the last two.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise MalformedPayloadError(f"body is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    else:
        text = raw
    if not text.strip():
        raise MalformedPayloadError("body is empty, expected a JSON object")
    try:
        body: object = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedPayloadError(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError as exc:  # Arrays or objects nested deeper than the decoder can follow.
        raise MalformedPayloadError("body is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # An integer too long to convert (over 4300 digits).
        raise MalformedPayloadError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        kind = "null" if body is None else _JSON_TYPE_NAMES.get(type(body), type(body).__name__)
        raise MalformedPayloadError(f"body must be a JSON object, got {kind}")
    _check_tree(body)  # pyright: ignore[reportUnknownArgumentType]
    return body  # pyright: ignore[reportUnknownVariableType]  # JSON object keys are always strings


def _check_tree(body: dict[str, Any]) -> None:
    """Refuse nesting deeper than `MAX_JSON_DEPTH` and lone surrogates, reporting the first in document order.

    Iterative, so it cannot itself run out of stack on what the decoder accepted.
    """
    stack: list[tuple[object, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, dict | list):
            continue
        if len(path) >= MAX_JSON_DEPTH:  # The body object is level 1, so this one is level len(path) + 1.
            raise MalformedPayloadError(
                f"body is nested too deeply: more than {MAX_JSON_DEPTH} levels of arrays and objects"
            )
        children: list[tuple[object, tuple[str | int, ...]]] = []
        if isinstance(value, dict):
            for key, child in value.items():  # pyright: ignore[reportUnknownVariableType]
                assert isinstance(key, str)
                if not _is_text(key):
                    raise MalformedPayloadError(f"{_field((*path, key))}: a key has {_SURROGATE_PROBLEM}")
                children.append((child, (*path, key)))
        else:
            children = [(child, (*path, index)) for index, child in enumerate(value)]  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
        stack.extend(reversed(children))


def _is_text(text: str) -> bool:
    return text.isascii() or _SURROGATE.search(text) is None


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    if text.isascii() or (match := _SURROGATE.search(text)) is None:
        return
    raise MalformedPayloadError(
        f"{_field(path)}: {_SURROGATE_PROBLEM}: \\u{ord(match.group()):04x} at character {match.start()}"
    )


def _field(path: tuple[str | int, ...]) -> str:
    r"""A field's path as it reads in an error: ``transcript[1].text``, ``metadata['odd key']``.

    Keys that are not plain names are quoted and escaped (``'k\ud800'``), so the message is always printable text.
    """
    parts: list[str] = []
    for item in path:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif _NAME.fullmatch(item):
            parts.append(f".{item}" if parts else item)
        else:
            shown = item if len(item) <= 40 else item[:40] + "..."
            parts.append(f"[{ascii(shown)}]")
    return "".join(parts) or "body"
