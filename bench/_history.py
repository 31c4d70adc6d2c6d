"""After a level: did the server keep every conversation exactly as it was spoken?

Each conversation must hold exactly its turns, in order: the caller's words with their `turn_id`, and a
`completed` reply with the words the fake LLM streamed. SQLite and Redis are opened with `open_store`, as another
worker would; the memory store lives inside the server, so it is read through the admin API, which answers with
the same `ConversationDetail` (`layercode_agent.conversations`). The floor (`bench.floor`, store URL `floor://`)
serves what it kept at `GET /history/{conversation_id}`, read into the same `ConversationDetail`.
"""

from __future__ import annotations

import asyncio

import httpx

from layercode_agent.conversations import ConversationDetail, TurnView, get_conversation
from layercode_agent.stores import StoreError, open_store

from .load import Conversation

__all__ = ["check_history"]

_SETTLE_SECONDS = 5.0
"""How long a reply may stay `pending` after its `response.end` before it counts as a defect."""


def defects_of(detail: ConversationDetail | None, conversation: Conversation) -> list[str]:
    """What is wrong with one stored conversation (empty when it is exactly what was said)."""
    if detail is None:
        return ["nothing stored"]
    problems: list[str] = []
    if len(detail.turns) != len(conversation.turns):
        problems.append(f"{len(detail.turns)} stored turns for {len(conversation.turns)} spoken")
    for index, (stored, spoken) in enumerate(zip(detail.turns, conversation.turns, strict=False), start=1):
        if stored.kind != "message" or stored.turn_id != spoken.turn_id:
            problems.append(f"turn {index}: {stored.kind} {stored.turn_id}, expected message {spoken.turn_id}")
        elif stored.user_text != spoken.text:
            problems.append(f"turn {index}: caller text {stored.user_text!r}")
        elif stored.status != "completed":
            problems.append(f"turn {index}: reply {stored.status}")
        elif stored.reply_text != spoken.expected_reply:
            problems.append(f"turn {index}: reply text {stored.reply_text[:60]!r}")
    return problems


async def check_history(
    conversations: list[Conversation], *, store_url: str, server_base: str, admin_token: str
) -> list[str]:
    """One line per defective conversation, `"<conversation id>: <what is wrong>"`; empty when all are right."""
    pending = list(conversations)
    found: dict[str, list[str]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _SETTLE_SECONDS
    while True:
        try:
            details = await _read(pending, store_url, server_base, admin_token)
        except (StoreError, httpx.HTTPError, ValueError) as exc:
            return [f"{c.conversation_id}: history unreadable ({type(exc).__name__}: {exc})" for c in pending]
        found.update({c.conversation_id: defects_of(d, c) for c, d in zip(pending, details, strict=True)})
        unsettled = [
            conversation
            for conversation, detail in zip(pending, details, strict=True)
            if detail is not None and any(turn.status == "pending" for turn in detail.turns)
        ]
        if not unsettled or loop.time() > deadline:
            break
        pending = unsettled
        await asyncio.sleep(0.2)
    return [f"{cid}: {'; '.join(problems)}" for cid, problems in found.items() if problems]


async def _read(
    conversations: list[Conversation], store_url: str, server_base: str, admin_token: str
) -> list[ConversationDetail | None]:
    floor = store_url.startswith("floor://")
    if not floor and not store_url.startswith("memory://"):
        async with open_store(store_url) as store:
            return [await get_conversation(store, c.conversation_id) for c in conversations]
    details: list[ConversationDetail | None] = []
    headers = {} if floor else {"authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=server_base, headers=headers, timeout=30) as http:
        for conversation in conversations:
            cid = conversation.conversation_id
            response = await http.get(f"/history/{cid}" if floor else f"/api/conversations/{cid}")
            if response.status_code == 404:
                details.append(None)
            elif floor:
                response.raise_for_status()
                turns = [TurnView(kind="message", **turn) for turn in response.json()["turns"]]
                details.append(ConversationDetail(conversation_id=cid, turns=turns))
            else:
                response.raise_for_status()
                details.append(ConversationDetail.model_validate_json(response.content))
    return details
