"""The turn record: what each turn of a conversation looks like in the store, and how it changes.

A conversation is pydantic-ai's message log, keyed by Layercode's `conversation_id`. Every message
of a turn carries `metadata` naming the turn and its part in it:

    user message      ModelRequest  {"turn_id", "role": "user", "delivery"}
    placeholder       ModelResponse {"turn_id", "role": "assistant", "status": "pending", "owner", "started_at"}
                      (no parts: stored before the reply streams, so a crash or a barge-in leaves a trace)
    tool call/result  ModelResponse / ModelRequest {"turn_id", "role": "tool"}
    reply             ModelResponse {"turn_id", "role": "assistant", "status": completed|interrupted|failed|lost}
                      (+ "text_sent" and "text_heard" once Layercode said what the caller heard)
    welcome           ModelResponse {"turn_id", "role": "assistant", "status": "completed", "kind": "welcome"}

Only the newest messages ever change: the placeholder becomes the reply, and an interrupted reply
becomes what the caller heard. [`History.change`][layercode_agent.history.History.change] does that
atomically: it reads the log, lets a pure function decide, and writes the new tail with the record's
revision check, retrying when another worker wrote first. The log never branches for it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from pydantic_ai.conversation_store import ConversationConflict, ConversationEntry, ConversationRecord
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.usage import RunUsage

from .stores import AgentStore, StoreError

__all__ = [
    "COMPLETED",
    "FAILED",
    "INTERRUPTED",
    "LOST",
    "PENDING",
    "Change",
    "Heard",
    "History",
    "ReplyState",
    "as_heard",
    "find_reply",
    "has_turn",
    "last_reply",
    "llm_messages",
    "pending_reply",
    "reply_text",
    "turn_meta",
    "what_was_heard",
]

PENDING = "pending"
COMPLETED = "completed"
INTERRUPTED = "interrupted"
FAILED = "failed"
LOST = "lost"
"""Reply statuses. `lost`: its worker died mid-stream and another one closed the turn."""

_T = TypeVar("_T")


def turn_meta(turn_id: str | None, role: str, status: str | None = None, **extra: Any) -> dict[str, Any]:
    """The metadata a message of a turn carries."""
    meta: dict[str, Any] = {"turn_id": turn_id, "role": role}
    if status is not None:
        meta["status"] = status
    meta.update(extra)
    return meta


def _meta(message: ModelMessage) -> dict[str, Any]:
    return message.metadata or {}


def has_turn(messages: Sequence[ModelMessage], turn_id: str, delivery: str | None = None) -> bool:
    """Whether the log already holds this turn (by `turn_id`, or by the body that delivered it)."""
    for message in messages:
        meta = _meta(message)
        if meta.get("turn_id") == turn_id and meta.get("role") in {"user", "assistant"}:
            return True
        if delivery is not None and meta.get("delivery") == delivery:
            return True
    return False


@dataclass(frozen=True)
class ReplyState:
    """The assistant reply of one turn, as stored."""

    index: int
    """Where the reply (or its placeholder) is in the log."""
    turn_id: str | None
    status: str
    owner: str | None
    text: str


def reply_text(message: ModelResponse) -> str:
    """The spoken text of a reply."""
    return "".join(part.content for part in message.parts if isinstance(part, TextPart))


def _reply_at(messages: Sequence[ModelMessage], index: int) -> ReplyState | None:
    message = messages[index]
    meta = _meta(message)
    if not isinstance(message, ModelResponse) or meta.get("role") != "assistant":
        return None
    return ReplyState(
        index=index,
        turn_id=meta.get("turn_id"),
        status=str(meta.get("status", COMPLETED)),
        owner=meta.get("owner"),
        text=reply_text(message),
    )


def find_reply(messages: Sequence[ModelMessage], turn_id: str) -> ReplyState | None:
    """The newest assistant reply (or placeholder) of `turn_id`, if the log has one."""
    for index in range(len(messages) - 1, -1, -1):
        if _meta(messages[index]).get("turn_id") == turn_id and (reply := _reply_at(messages, index)):
            return reply
    return None


def pending_reply(messages: Sequence[ModelMessage]) -> ReplyState | None:
    """The placeholder of a turn still streaming (or whose worker died), if the log ends with one."""
    for index in range(len(messages) - 1, -1, -1):
        reply = _reply_at(messages, index)
        if reply is not None:
            return reply if reply.status == PENDING else None
        if _meta(messages[index]).get("role") == "user":
            return None
    return None


def last_reply(messages: Sequence[ModelMessage]) -> ReplyState | None:
    """The newest assistant reply, if nothing but its own turn's messages follow it."""
    if messages and (reply := _reply_at(messages, len(messages) - 1)):
        return reply
    return None


def llm_messages(messages: Sequence[ModelMessage], interrupted_mark: str) -> list[ModelMessage]:
    """The history as the model should see it: what the caller actually heard.

    Placeholders and replies nobody heard are left out; an interrupted reply ends with
    `interrupted_mark`, so the model knows the caller stopped listening there.
    """
    view: list[ModelMessage] = []
    for message in messages:
        meta = _meta(message)
        if isinstance(message, ModelResponse) and meta.get("role") == "assistant":
            status = meta.get("status")
            text = reply_text(message)
            if status == PENDING or not message.parts or (status in {INTERRUPTED, LOST} and not text.strip()):
                continue
            if status == INTERRUPTED and interrupted_mark:
                message = replace(message, parts=[TextPart(f"{text.rstrip()} {interrupted_mark}")])
        view.append(message)
    return view


@dataclass(frozen=True)
class Heard:
    """What the caller heard of a reply they barged into."""

    text: str | None
    """The reply's text as heard; `None`: nothing says where it was cut, so keep the reply as stored."""
    refused: str | None = None
    """Why Layercode's `text_heard` was not taken, for the log (never quoting it); `None` if it was taken."""


def what_was_heard(sent: str, text_heard: str | None, words_heard: int | None) -> Heard:
    """What to keep of a reply that was `sent` when Layercode reports an interruption.

    `text_heard` is taken only when it is a prefix of what was sent, whitespace aside (runs of spaces,
    tabs and line breaks count as one space, and leading and trailing ones not at all), since it can
    only be the start of what the caller was played. Case and punctuation count: Layercode reports the
    text it was sent back, so a different letter means a different text, and accepting it would let
    an interruption rewrite a reply into words it never had. Otherwise what was sent is kept, cut to
    `words_heard` words when Layercode gave a count.
    """
    words = sent.split()
    refused: str | None = None
    if text_heard is not None:
        heard = " ".join(text_heard.split())
        if " ".join(words).startswith(heard):
            return Heard(heard)
        refused = f"text_heard ({len(heard)} characters) is not a prefix of the {len(sent)} characters sent"
    if words_heard is not None:
        return Heard(" ".join(words[: max(words_heard, 0)]), refused)
    return Heard(None, refused)


def as_heard(message: ModelMessage, heard: str | None) -> ModelMessage:
    """A reply rewritten to what the caller heard (`None`: its text kept), marked interrupted.

    The first rewrite keeps the reply's text as `text_sent`; `text_heard` is what it became.
    """
    meta = dict(message.metadata or {})
    meta["status"] = INTERRUPTED
    if heard is None or not isinstance(message, ModelResponse):
        return replace(message, metadata=meta)
    meta.setdefault("text_sent", reply_text(message))
    meta["text_heard"] = heard
    return replace(message, parts=[TextPart(heard)] if heard else [], metadata=meta)


@dataclass
class Change(Generic[_T]):
    """What a decision over the log wants: keep the first `keep` messages and append `add`, then return `result`.

    `keep=None` leaves the log as it is.
    """

    result: _T
    keep: int | None = None
    add: list[ModelMessage] = field(default_factory=list[ModelMessage])
    usage: RunUsage | None = None
    """The conversation's accumulated usage after the change, if it changes."""


class History:
    """Atomic changes to the newest messages of a stored conversation."""

    def __init__(
        self,
        store: AgentStore,
        *,
        attempts: int = 12,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        """Wrap a store.

        Args:
            store: The store.
            attempts: Writes tried before giving up when other writers keep winning.
            observe: Called with an operation name and its duration in seconds, for metrics.
        """
        self.store = store
        self.attempts = attempts
        self._observe = observe

    async def read(self, conversation_id: str) -> tuple[ConversationRecord | None, list[ConversationEntry]]:
        """The record and its history (empty when the conversation is new)."""
        record = await self.store.read_record(conversation_id)
        if record is None or record.head_id is None:
            return record, []
        return record, await self.store.read_history(record.head_id)

    async def messages(self, conversation_id: str) -> list[ModelMessage]:
        """The stored messages of a conversation."""
        started = time.perf_counter()
        _, history = await self.read(conversation_id)
        if self._observe is not None:
            self._observe("read", time.perf_counter() - started)
        return [entry.message for entry in history]

    async def change(
        self,
        conversation_id: str,
        decide: Callable[[list[ModelMessage], ConversationRecord | None], Change[_T]],
        *,
        operation: str = "change",
    ) -> _T:
        """Read the log, let `decide` say what to change, write it with the revision check; retry on a conflict.

        `decide` must be pure: it may run several times.

        Raises:
            StoreError: If the store fails, or other writers kept winning for every attempt.
        """
        started = time.perf_counter()
        try:
            return await self._change(conversation_id, decide)
        finally:
            if self._observe is not None:
                self._observe(operation, time.perf_counter() - started)

    async def _change(
        self,
        conversation_id: str,
        decide: Callable[[list[ModelMessage], ConversationRecord | None], Change[_T]],
    ) -> _T:
        for attempt in range(self.attempts):
            try:
                record, history = await self.read(conversation_id)
            except LookupError:
                continue  # A concurrent delete or rewrite released the history mid-read.
            messages = [entry.message for entry in history]
            change = decide(messages, record)
            if change.keep is None:
                return change.result
            parent_id = history[change.keep - 1].id if change.keep else None
            entries: list[ConversationEntry] = []
            for message in change.add:
                entries.append(ConversationEntry(parent_id=parent_id, message=message))
                parent_id = entries[-1].id
            usage = change.usage if change.usage is not None else record.usage if record else RunUsage()
            updated = ConversationRecord(
                conversation_id=conversation_id,
                head_id=parent_id,
                usage=usage,
                deferred_tool_requests=record.deferred_tool_requests if record else None,
                scope=record.scope if record else None,
                forked_from=record.forked_from if record else None,
                forked_at=record.forked_at if record else None,
                branches=list(record.branches) if record else [],
                updated_at=datetime.now(UTC),
            )
            try:
                await self.store.write_record_replacing(
                    updated,
                    new_entries=entries,
                    expected_revision=record.revision if record else None,
                    released=[entry.id for entry in history[change.keep :]],
                )
            except ConversationConflict:
                # Another writer won; spread the retries so a crowd of writers doesn't collide again.
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                continue
            return change.result
        raise StoreError(
            f"conversation {conversation_id!r} kept changing while saving; gave up after {self.attempts} attempts"
        )
