"""What a tool can know about the call it runs in.

Every run gets a `CallContext` as its deps, so a user's own agent (`AGENT=module:attribute`) can
declare `deps_type=CallContext` and read the caller's number or the metadata their front end sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CallContext"]


@dataclass(frozen=True)
class CallContext:
    """The conversation and turn a run belongs to, and the metadata Layercode forwarded."""

    conversation_id: str
    turn_id: str | None = None
    session_id: str | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict[str, Any])
