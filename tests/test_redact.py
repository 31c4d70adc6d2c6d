from __future__ import annotations

import pytest

from layercode_agent.redact import MASK, redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://user:pw@host/0?ttl=60&prefix=a:", "rediss://user:***@host/0?ttl=60&prefix=a:"),
        ("redis://host/0?password=pw&ttl=60", "redis://host/0?password=***&ttl=60"),
        ("https://collector/v1/traces?Api-Key=k&x=1#top", "https://collector/v1/traces?Api-Key=***&x=1#top"),
        ("https://TOKEN@github.com/org/repo", "https://***@github.com/org/repo"),
        # Unencoded separators in a password: hide up to the last @ rather than show part of it.
        ("redis://:p@ss/w#rd@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        # Malformed for URL parsers (an unclosed IPv6 bracket), still redacted, never an error.
        ("redis://:pw@[::1:6379/0", "redis://:***@[::1:6379/0"),
        (":pw@127.0.0.1:6379", ":***@127.0.0.1:6379"),
        ("sqlite:////var/lib/agent/conversations.db", "sqlite:////var/lib/agent/conversations.db"),
        ("sqlite:///data/conversations.db", "sqlite:///data/conversations.db"),
        ("memory://", "memory://"),
        ("http://127.0.0.1:4318/v1/traces", "http://127.0.0.1:4318/v1/traces"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_hides_every_form_of_each_secret() -> None:
    text = "AUTH p@ss:w0rd failed; url had p%40ss%3Aw0rd; other s3cret"
    assert redact_text(text, ["p@ss:w0rd", "s3cret", ""]) == f"AUTH {MASK} failed; url had {MASK}; other {MASK}"
    assert redact_text("nothing to hide", []) == "nothing to hide"
