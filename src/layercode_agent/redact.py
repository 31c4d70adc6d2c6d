"""Hide credentials in the text the service shows: banners, log lines, error messages.

Why one module: a store URL (`redis://:password@host:6379/0`), a collector endpoint or any other URL may
carry a password in its user info or a token in its query. Every place that shows such a URL, or a driver's
error text that might quote a password, goes through these two functions, so a new display cannot forget.
Plain stdlib, so every layer may import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final
from urllib.parse import quote, unquote

__all__ = ["MASK", "redact_text", "redact_url"]

MASK: Final = "***"
"""What a hidden value is replaced with."""

_SECRET_PARAMETERS: Final = ("password", "passwd", "pwd", "secret", "token", "key", "auth", "credential", "sig")
"""Query parameter names containing one of these (in any case) have their values hidden."""


def redact_url(url: str) -> str:
    """`url` with its user info's password and secret-looking query values replaced by `***`.

    `redis://user:pw@host:6379/0?password=pw&ttl=60` becomes `redis://user:***@host:6379/0?password=***&ttl=60`.
    User info without a `:` is hidden whole (`https://TOKEN@host`), since a lone name is often a token.
    Text without `://` is read as a URL without its scheme (`:pw@host:6379`). Never raises.

    Args:
        url: The URL to show.

    Returns:
        The URL, safe for a banner, a log line or an error message.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    head, query_mark, query = rest.partition("?")
    if not head.startswith("/"):
        # An authority comes first. Everything before its last @ is user info, even an unencoded / or #
        # that URL parsers would stop at: better to hide a little too much than part of a password.
        user_info, at, host = head.rpartition("@")
        if at:
            name, colon, _ = user_info.partition(":")
            head = f"{name}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    if query_mark:
        query = _redact_query(query)
    return f"{scheme}{separator}{head}{query_mark}{query}"


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret, as given and percent-encoded, replaced by `***`.

    For third-party error messages that may quote a credential they were given (a driver echoing its
    connection options, say). Empty secrets are ignored; longer ones are replaced first.
    """
    forms = {form for secret in secrets if secret for form in (secret, quote(secret, safe=""), unquote(secret))}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    return text


def _redact_query(query: str) -> str:
    query, hash_mark, fragment = query.partition("#")
    parts: list[str] = []
    for part in query.split("&"):
        name, equals, value = part.partition("=")
        if equals and value and any(word in unquote(name).lower() for word in _SECRET_PARAMETERS):
            part = f"{name}={MASK}"
        parts.append(part)
    return "&".join(parts) + hash_mark + fragment
