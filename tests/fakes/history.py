"""Two views of a conversation the real server kept: the stored messages, and what one LLM request carried."""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, UserPromptPart

from layercode_agent.stores import SessionEventRecord, open_store

from .openai_server import Received

# --- What the store holds ---------------------------------------------------------------------------


class Row(NamedTuple):
    """One stored message, reduced to what a turn record promises: `(role, status, text, meta)`."""

    role: str | None
    status: str | None
    text: str
    meta: dict[str, Any]

    @property
    def turn_id(self) -> str | None:
        return self.meta.get("turn_id")

    @property
    def brief(self) -> tuple[str | None, str | None, str, str | None]:
        return (self.role, self.status, self.text, self.turn_id)


async def stored(store_url: str, conversation_id: str) -> list[Row]:
    """The conversation as the store holds it, read by a store of our own (as another worker would)."""
    async with open_store(store_url) as store:
        conversation = await store.load(conversation_id)
    assert conversation is not None, f"conversation {conversation_id} was never stored"
    rows: list[Row] = []
    for message in conversation.messages:
        meta = dict(message.metadata or {})
        if isinstance(message, ModelRequest):
            text = "".join(
                part.content
                for part in message.parts
                if isinstance(part, UserPromptPart) and isinstance(part.content, str)
            )
        else:
            assert isinstance(message, ModelResponse)
            text = "".join(part.content for part in message.parts if isinstance(part, TextPart))
        rows.append(Row(meta.get("role"), meta.get("status"), text, meta))
    return rows


async def session_events(store_url: str, conversation_id: str) -> list[SessionEventRecord]:
    """The session events (`session.end`, ...) the store holds for a conversation."""
    async with open_store(store_url) as store:
        return await store.session_events(conversation_id)


# --- What the LLM was sent --------------------------------------------------------------------------


def said(messages: list[ModelMessage]) -> list[tuple[str, str]]:
    """(role, text) of every user prompt and assistant text in a history, or in what a model was sent."""
    out: list[tuple[str, str]] = []
    for message in messages:
        for part in message.parts:
            if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                out.append(("user", part.content))
            elif isinstance(part, TextPart):
                out.append(("assistant", part.content))
    return out


def text_of(content: Any) -> str:
    """The text of an OpenAI message's `content`: a string, a list of content parts, or none."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))  # pyright: ignore[reportUnknownMemberType]
    return "" if content is None else str(content)


def dialogue(received: Received, *, words_only: bool = False) -> list[tuple[str, str]]:
    """What one LLM request carried, without the system prompt: (role, text) in order.

    With `words_only`, only the user's and the assistant's messages that carry text: no tool calls or results.
    """
    said = [(str(message["role"]), text_of(message.get("content"))) for message in received.messages]
    if words_only:
        return [(role, text) for role, text in said if role in ("user", "assistant") and text]
    return [(role, text) for role, text in said if role != "system"]
