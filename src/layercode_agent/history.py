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
atomically (`AgentStore.rewrite`): it reads the log, lets a pure function decide, and writes the new
tail with the record's revision check, retrying when another worker wrote first; SQLite does all of
it in one transaction on one of its threads. The log never branches for it.

The decisions themselves are pure functions here too (`decide_begin`, `decide_close`, what the caller
heard, the messages that close a turn), so they are tested as tables, without a store or a model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar, cast

from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponsePart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.usage import RunUsage

from .stores import AgentStore, LogWrite

__all__ = [
    "COMPLETED",
    "FAILED",
    "INTERRUPTED",
    "LOST",
    "PENDING",
    "BargeIn",
    "Busy",
    "Change",
    "Duplicate",
    "Heard",
    "History",
    "ReplyState",
    "Started",
    "TakeOver",
    "Unclosed",
    "as_heard",
    "closing_messages",
    "decide_begin",
    "decide_close",
    "find_reply",
    "has_turn",
    "is_placeholder",
    "last_reply",
    "llm_messages",
    "lost_reply",
    "pending_reply",
    "reply_text",
    "result_messages",
    "rewritten_as_heard",
    "stored_as",
    "turn_meta",
    "unmarked",
    "what_was_heard",
    "with_filler",
    "written",
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
    # The log's messages may be the store's cached objects (`AgentStore.read_log`). pydantic-ai fills in and
    # adds to the requests that end the history it is given (run id, timestamps, its metadata namespace),
    # in place: those get copies of their own. Every earlier message it only reads.
    index = len(view)
    while index and isinstance(view[index - 1], ModelRequest):
        index -= 1
        view[index] = _detached(cast(ModelRequest, view[index]))
    return view


def _detached(request: ModelRequest) -> ModelRequest:
    """A copy of `request` that shares no list or dict with it (the parts themselves are not changed in place)."""
    return replace(request, parts=list(request.parts), metadata=copy.deepcopy(request.metadata))


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
        """The record and its history (empty when the conversation is new); see `AgentStore.read_log`."""
        return await self.store.read_log(conversation_id)

    async def messages(self, conversation_id: str) -> list[ModelMessage]:
        """The stored messages of a conversation (shared with the store's cache: never change them in place)."""
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
        """Read the log, let `decide` say what to change, and write it atomically (`AgentStore.rewrite`).

        `decide` must be pure: it may run several times, and on one of the store's threads.

        Raises:
            StoreError: If the store fails, or other writers kept winning for every attempt.
        """
        result, _ = await self.change_written(conversation_id, decide, operation=operation)
        return result

    async def change_written(
        self,
        conversation_id: str,
        decide: Callable[[list[ModelMessage], ConversationRecord | None], Change[_T]],
        *,
        operation: str = "change",
    ) -> tuple[_T, LogWrite | None]:
        """`change`, and what it wrote (`None`: nothing), its record's revision included."""
        started = time.perf_counter()
        landed: list[LogWrite | None] = [None]

        def plan(record: ConversationRecord | None, history: list[ConversationEntry]) -> tuple[_T, LogWrite | None]:
            change = decide([entry.message for entry in history], record)
            # The store writes what the last plan it made said: each plan replaces the one before.
            landed[0] = None if change.keep is None else written(conversation_id, record, history, change)
            return change.result, landed[0]

        try:
            return await self.store.rewrite(conversation_id, plan, attempts=self.attempts), landed[0]
        finally:
            if self._observe is not None:
                self._observe(operation, time.perf_counter() - started)


def written(
    conversation_id: str, record: ConversationRecord | None, history: list[ConversationEntry], change: Change[Any]
) -> LogWrite:
    """What storing `change` writes: the entries it adds after the ones it keeps, and the record pointing at them."""
    assert change.keep is not None
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
    return LogWrite(updated, entries, [entry.id for entry in history[change.keep :]])


# --- The pure decisions of a turn's record -----------------------------------------------------------
#
# The turn runner decides what to store by these functions alone: each takes the log (and what the
# runner knows) and returns what to write, so `History.change` can run them again after a conflict.


class BargeIn(Protocol):
    """What Layercode said of the reply the caller barged into (its `interruption_context`)."""

    @property
    def previous_turn_interrupted(self) -> bool:
        """Whether the caller cut the previous reply off."""
        ...

    @property
    def assistant_turn_id(self) -> str | None:
        """The turn of the reply cut off, if Layercode named it."""
        ...

    @property
    def text_heard(self) -> str | None:
        """What the caller heard of it, as Layercode reports it."""
        ...

    @property
    def words_heard(self) -> int | None:
        """How many of its words the caller heard."""
        ...


@dataclass(frozen=True)
class Unclosed:
    """A turn's closing messages the store did not take: kept for the conversation's next turn on this worker."""

    turn_id: str
    closing: list[ModelMessage]
    usage: RunUsage | None

    @property
    def text(self) -> str:
        """The reply's text, as stored."""
        reply = self.closing[-1]
        return reply_text(reply) if isinstance(reply, ModelResponse) else ""


@dataclass(frozen=True)
class TakeOver:
    """The open turn a new turn closes itself, and what this worker knows of its reply."""

    turn_id: str | None
    sent: str | None = None
    """What its response passed on to Layercode, when this worker streamed it."""
    kept: Unclosed | None = None
    """Its closing messages, when this worker's store write of them failed."""


@dataclass(frozen=True)
class Started:
    """Beginning a turn stored its first messages."""

    messages: list[ModelMessage]
    """The log as it now stands, ending with the new turn's messages."""
    refused: str | None = None
    """Why the `interruption_context` was not taken as it came, for the log."""
    recovered: Unclosed | None = None
    """A reply of this worker the store had not taken, now stored with this turn's first messages."""


@dataclass(frozen=True)
class Duplicate:
    """The log already holds the turn: a repeated delivery."""


@dataclass(frozen=True)
class Busy:
    """Another turn is still open (streaming, or its worker died): it must be closed first."""

    turn_id: str | None
    owner: str | None


def decide_begin(
    messages: list[ModelMessage],
    record: ConversationRecord | None,
    *,
    turn_id: str,
    delivery: str | None,
    new_messages: list[ModelMessage],
    interruption: BargeIn | None,
    take_over: TakeOver | None,
    spoken: Callable[[str], str],
) -> Change[Started | Duplicate | Busy]:
    """How beginning a turn changes the log: nothing for a duplicate or while another turn is open.

    Otherwise the open turn named by `take_over` is closed (with this worker's unstored reply when it
    has one, else as `lost`), a reply the caller barged into becomes what they heard, and
    `new_messages` follow. `spoken` turns a reply as the model wrote it into what the stream carried.
    """
    if has_turn(messages, turn_id, delivery):
        return Change(Duplicate())
    keep = len(messages)
    replaced: list[ModelMessage] = []
    refused: str | None = None
    recovered: Unclosed | None = None
    usage: RunUsage | None = None
    barged_in = interruption if interruption is not None and interruption.previous_turn_interrupted else None
    open_reply = pending_reply(messages)
    if open_reply is not None:
        if take_over is None or open_reply.turn_id != take_over.turn_id:
            return Change(Busy(open_reply.turn_id, open_reply.owner))
        keep = open_reply.index
        heard = barged_in if barged_in and barged_in.assistant_turn_id in {None, open_reply.turn_id} else None
        kept = take_over.kept
        if kept is not None and kept.turn_id == open_reply.turn_id:
            # This worker's reply, which the store did not take: stored now as its turn meant to close.
            closing = list(kept.closing)
            if heard is not None:
                closing[-1], refused = rewritten_as_heard(closing[-1], heard, spoken)
            replaced = [*closing, *messages[open_reply.index + 1 :]]
            recovered = kept
            if kept.usage is not None:
                usage = (record.usage if record is not None else RunUsage()) + kept.usage
        else:
            lost, refused = lost_reply(open_reply.turn_id, take_over.sent, heard)
            replaced = [lost, *messages[open_reply.index + 1 :]]
    elif barged_in is not None:
        reply = last_reply(messages)
        if reply is not None and barged_in.assistant_turn_id in {None, reply.turn_id}:
            keep = reply.index
            rewritten, refused = rewritten_as_heard(messages[reply.index], barged_in, spoken)
            replaced = [rewritten]
    added = [*replaced, *new_messages]
    started = Started([*messages[:keep], *added], refused=refused, recovered=recovered)
    return Change(started, keep=keep, add=added, usage=usage)


def decide_close(
    messages: list[ModelMessage],
    record: ConversationRecord | None,
    *,
    turn_id: str,
    owner: str,
    closing: list[ModelMessage],
    usage: RunUsage | None,
) -> Change[bool]:
    """Replace this worker's placeholder of `turn_id` with `closing`, adding `usage` to the conversation's total.

    The result is False if another worker closed it first; a reply already stored as `closing` (a
    close written though the store said it failed) counts as closed.
    """
    reply = find_reply(messages, turn_id)
    if reply is None or reply.status != PENDING or reply.owner != owner:
        return Change(reply is not None and stored_as(reply, closing))
    total = None if usage is None else (record.usage if record is not None else RunUsage()) + usage
    return Change(True, keep=reply.index, add=[*closing, *messages[reply.index + 1 :]], usage=total)


def rewritten_as_heard(
    message: ModelMessage, barged_in: BargeIn, spoken: Callable[[str], str]
) -> tuple[ModelMessage, str | None]:
    """A reply the caller barged into, rewritten to what they heard of it; and why `text_heard` was refused.

    What was sent is the reply as spoken (`spoken` of what the model wrote, which is what the stream
    carried), the first time it is rewritten as its `text_sent`.
    """
    if not isinstance(message, ModelResponse):
        return as_heard(message, None), None
    sent = _meta(message).get("text_sent")
    heard = what_was_heard(
        spoken(sent if isinstance(sent, str) else reply_text(message)), barged_in.text_heard, barged_in.words_heard
    )
    return as_heard(message, heard.text), heard.refused


def lost_reply(turn_id: str | None, sent: str | None, barged_in: BargeIn | None) -> tuple[ModelResponse, str | None]:
    """The reply of a turn a new turn closes itself: the words its stream sent when this worker knows them.

    Layercode's `interruption_context`, when it speaks of this turn, cuts them to what the caller
    heard; without them, it is all there is to go on.
    """
    meta = turn_meta(turn_id, "assistant", LOST)
    text = sent or ""
    refused: str | None = None
    if barged_in is not None and sent is not None:
        heard = what_was_heard(sent, barged_in.text_heard, barged_in.words_heard)
        refused = heard.refused
        if heard.text is not None:
            meta["text_sent"] = sent
            meta["text_heard"] = text = heard.text
    elif barged_in is not None and barged_in.text_heard is not None:
        meta["text_heard"] = text = barged_in.text_heard
    return ModelResponse(parts=[TextPart(text)] if text else [], metadata=meta), refused


def stored_as(reply: ReplyState, closing: list[ModelMessage]) -> bool:
    """Whether a stored reply is the one `closing` ends with (a close written though the store said it failed)."""
    last = closing[-1]
    return (
        isinstance(last, ModelResponse) and reply.status == _meta(last).get("status") and reply.text == reply_text(last)
    )


def is_placeholder(messages: Sequence[ModelMessage]) -> bool:
    """Whether the messages end with a reply still to be streamed."""
    return bool(messages) and _meta(messages[-1]).get("status") == PENDING


def with_filler(message: ModelMessage, filler: str) -> ModelMessage:
    """The reply with the filler spoken before it at the start of its text."""
    if not isinstance(message, ModelResponse):
        return message
    parts = list(message.parts)
    for index, part in enumerate(parts):
        if isinstance(part, TextPart):
            parts[index] = replace(part, content=filler + part.content)
            return replace(message, parts=parts)
    return replace(message, parts=[TextPart(filler.strip()), *parts])


def closing_messages(
    turn_id: str, finished_calls: Sequence[tuple[ToolCallPart, ToolReturnPart]], text: str, status: str
) -> list[ModelMessage]:
    """The messages that close a turn cut short: the tool calls that returned, then the reply's text.

    Only tool calls that returned are kept: the history never holds a call without its result.
    """
    messages: list[ModelMessage] = []
    if finished_calls:
        messages.append(ModelResponse(parts=[call for call, _ in finished_calls], metadata=turn_meta(turn_id, "tool")))
        messages.append(ModelRequest(parts=[ret for _, ret in finished_calls], metadata=turn_meta(turn_id, "tool")))
    parts = [TextPart(text)] if text else []
    messages.append(ModelResponse(parts=parts, metadata=turn_meta(turn_id, "assistant", status)))
    return messages


def result_messages(messages: Sequence[ModelMessage], turn_id: str, interrupted_mark: str) -> list[ModelMessage]:
    """A finished run's messages marked as this turn's: tool traffic, then the reply.

    A model that copied the interruption mark from its history gets it removed here (the caller
    never heard it either: the voice cleaner drops bracketed text), so it never spreads.
    """
    marked: list[ModelMessage] = []
    last = len(messages) - 1
    for index, message in enumerate(messages):
        role = "assistant" if index == last and isinstance(message, ModelResponse) else "tool"
        status = COMPLETED if role == "assistant" else None
        if role == "assistant" and interrupted_mark and isinstance(message, ModelResponse):
            message = replace(message, parts=[unmarked(part, interrupted_mark) for part in message.parts])
        marked.append(replace(message, metadata={**_meta(message), **turn_meta(turn_id, role, status)}))
    return marked


def unmarked(part: ModelResponsePart, interrupted_mark: str) -> ModelResponsePart:
    """A reply part without the interruption mark (and the spaces it leaves)."""
    if not isinstance(part, TextPart) or not interrupted_mark or interrupted_mark not in part.content:
        return part
    return replace(part, content=" ".join(part.content.replace(interrupted_mark, " ").split()))
