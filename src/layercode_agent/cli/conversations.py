"""`layercode-agent conversations list|show|delete`: what the store kept, read from a terminal.

The commands open the store the server is configured with (`CONVERSATION_STORE`, by default the
SQLite file in `DATA_DIR`), so they work beside a running server. They read through
`layercode_agent.conversations`, as the admin API does, and `--json` prints the same models it
returns. The store and pydantic-ai are imported inside the commands, so `--help` stays instant.

Everything shown comes from callers, the model or the store, so it goes through `printable` (escapes
for control and bidirectional characters) inside a Rich `Text` (no markup), and `--json` through
`printable_json`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..config import get_settings
from ._printable import printable, printable_json

if TYPE_CHECKING:
    from ..conversations import ConversationDetail, TurnView
    from ..stores import AgentStore

__all__ = ["app"]

_T = TypeVar("_T")

app = typer.Typer(
    name="conversations",
    help="Look at stored conversations: list them, show one turn by turn, delete one.",
    no_args_is_help=True,
)
# Soft wrap: messages are never broken by Rich, so paths and ids stay whole for copying (tables still fit).
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_STATUS_STYLES = {
    "completed": "green",
    "interrupted": "yellow",
    "pending": "cyan",
    "failed": "red",
    "lost": "red",
}
_TOOL_CHARS = 160
"""Longest tool arguments or result shown by `show` (`--json` has them whole)."""


@app.command("list")
def list_conversations(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most this many.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summaries as JSON.")] = False,
) -> None:
    """List the most recently saved conversations."""
    from pydantic import TypeAdapter

    from .. import conversations

    url = get_settings().store_url
    if (missing := _missing_database(url)) is not None:
        summaries: list[conversations.ConversationSummary] = []
        where = f"{missing} (the file does not exist yet)"
    else:

        async def work(store: AgentStore) -> tuple[str, list[conversations.ConversationSummary]]:
            return store.description, await conversations.list_conversations(store, limit)

        where, summaries = _run(url, work)
    if as_json:
        adapter = TypeAdapter(list[conversations.ConversationSummary])
        typer.echo(printable_json(adapter.dump_json(summaries, indent=2).decode()))
        return
    if not summaries:
        out.print(Text(f"No conversations in {printable(where)}.", style="dim"))
        return
    rows = [
        (
            printable(summary.conversation_id),
            _time(summary.updated_at),
            str(summary.turn_count),
            _status(summary.last_status),
            printable(summary.last_user_text or ""),
        )
        for summary in summaries
    ]
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    # Every column but the caller's words keeps its full width; those are cut to fit the terminal.
    room = out.width
    for index, name in enumerate(["conversation", "updated (UTC)", "turns", "last status"]):
        width = max(len(name), *(len(row[index]) for row in rows))
        room -= width + 2  # Two spaces between columns.
        table.add_column(name, no_wrap=True, min_width=width, justify="right" if name == "turns" else "left")
    if room >= 8:
        table.add_column("caller's last words", no_wrap=True, overflow="ellipsis", max_width=room)
    for row in rows:
        table.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in row[: len(table.columns)]))
    out.print(table)
    out.print(Text(f"{len(summaries)} most recent in {printable(where)}", style="dim"))


@app.command()
def show(
    conversation_id: Annotated[str, typer.Argument(help="Layercode's conversation_id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything stored about it as JSON.")] = False,
) -> None:
    """Show a conversation turn by turn: statuses, what an interrupted caller heard, tools, session events."""
    where, detail = _find(get_settings().store_url, conversation_id)
    if as_json:
        typer.echo(printable_json(detail.model_dump_json(indent=2)))
        return
    _print_detail(detail, where)


@app.command()
def delete(
    conversation_id: Annotated[str, typer.Argument(help="Layercode's conversation_id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete a conversation: its messages, session events and markers."""
    from .. import conversations

    url = get_settings().store_url
    where, detail = _find(url, conversation_id)
    if not yes:
        if not _can_ask():
            err.print(
                Text(
                    f"Not deleting {_quoted(conversation_id)}: there is no terminal to confirm on; "
                    "pass --yes to delete it."
                )
            )
            raise typer.Exit(1)
        question = (
            f"Delete conversation {_quoted(conversation_id)} ({detail.turn_count} turns, "
            f"{len(detail.session_events)} session events) from {printable(where)}?"
        )
        if not typer.confirm(question, default=False):
            err.print("Nothing deleted.")
            raise typer.Exit(1)

    async def work(store: AgentStore) -> bool:
        return await conversations.delete_conversation(store, conversation_id)

    if not _run(url, work):
        _unknown(conversation_id, where)
    out.print(Text(f"Deleted conversation {_quoted(conversation_id)} from {printable(where)}."))


# --- Opening the store ------------------------------------------------------------------------------


def _can_ask() -> bool:
    """Whether someone can answer a confirmation prompt."""
    return sys.stdin is not None and sys.stdin.isatty()


def _missing_database(url: str) -> Path | None:
    """The SQLite file a URL names when it does not exist, so a read does not create an empty database."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() != "sqlite" or not rest.startswith("/"):
        return None  # Not SQLite, or malformed: `open_store` explains.
    path = Path(rest[1:])
    return path if rest[1:] and not path.exists() else None


def _run(url: str, work: Callable[[AgentStore], Awaitable[_T]]) -> _T:
    """Open the store at `url`, run `work` on it and close it; store errors end the command with exit code 1."""
    from ..stores import StoreError, open_store

    async def main() -> _T:
        async with open_store(url) as store:
            if not store.shared:
                err.print(
                    Text(
                        f"The conversation store is {store.description}: this command runs in another process "
                        "and cannot see it. Use the server's GET /api/conversations (with ADMIN_TOKEN) instead."
                    )
                )
                raise typer.Exit(1)
            return await work(store)

    try:
        return asyncio.run(main())
    except StoreError as exc:
        err.print(Text.assemble(("Conversation store error: ", "bold red"), printable(str(exc))))
        raise typer.Exit(1) from None


def _find(url: str, conversation_id: str) -> tuple[str, ConversationDetail]:
    """The store's description and the conversation, or exit 1 naming both."""
    from ..conversations import get_conversation

    if (missing := _missing_database(url)) is not None:
        _unknown(conversation_id, f"{missing} (the file does not exist)")

    async def work(store: AgentStore) -> tuple[str, ConversationDetail | None]:
        return store.description, await get_conversation(store, conversation_id)

    where, detail = _run(url, work)
    if detail is None:
        _unknown(conversation_id, where)
    return where, detail


def _unknown(conversation_id: str, where: str) -> NoReturn:
    err.print(Text(f"No conversation {_quoted(conversation_id)} in {printable(where)}."))
    raise typer.Exit(1)


# --- Printing ---------------------------------------------------------------------------------------


def _print_detail(detail: ConversationDetail, where: str) -> None:
    out.print(
        Text.assemble(
            ("Conversation ", "bold"), (printable(detail.conversation_id), "bold"), ("  ·  " + printable(where), "dim")
        )
    )
    usage = detail.usage
    facts = [
        f"updated {_time(detail.updated_at)} UTC" if detail.updated_at else "no messages stored",
        _count(detail.turn_count, "turn"),
        f"{_count(usage.requests, 'LLM request')}, {usage.total_tokens} tokens",
    ]
    if usage.tool_calls:
        facts.append(_count(usage.tool_calls, "tool call"))
    out.print(Text("  ·  ".join(facts), style="dim"))
    for number, turn in enumerate(detail.turns, start=1):
        out.print()
        _print_turn(number, turn)
    if detail.session_events:
        out.print()
        out.print(Text("Session events", style="bold"))
        events = Table.grid(padding=(0, 2))
        for event in detail.session_events:
            events.add_row(
                "", _time(event.received_at), Text(printable(event.event_type)), Text(printable(event.session_id or ""))
            )
        out.print(events)
    if detail.recording_status or detail.recording_url:
        out.print(
            Text.assemble(
                ("Recording: ", "bold"),
                printable(" ".join(filter(None, [detail.recording_status, detail.recording_url]))),
            )
        )
    if detail.transcript is not None:
        out.print(Text(f"Layercode's transcript: {_count(len(detail.transcript), 'line')} (see --json)", style="dim"))


def _print_turn(number: int, turn: TurnView) -> None:
    header = Text.assemble((f"#{number} ", "bold"), (printable(turn.turn_id or "(no turn id)"), "dim"))
    if turn.kind != "message":
        header.append(f"  {turn.kind}", style="dim")
    header.append("  ")
    header.append_text(_status(turn.status))
    if turn.started_at is not None:
        header.append(f"  {_time(turn.started_at)}", style="dim")
    out.print(header)
    lines = Table.grid(padding=(0, 2))
    lines.add_column(style="bold", no_wrap=True)
    lines.add_column()
    if turn.user_text is not None:
        lines.add_row("  caller", _said(turn.user_text))
    for tool in turn.tools:
        call = Text(printable(f"{tool.tool_name}({_cut(tool.args)})"))
        if tool.result is not None:
            call.append(printable(f" -> {_cut(tool.result)}"), style="dim")
        if tool.outcome not in (None, "success"):
            call.append(printable(f" [{tool.outcome}]"), style="yellow")
        lines.add_row("  tool", call)
    if turn.text_heard is not None:
        lines.add_row("  heard", _said(turn.text_heard))
        if turn.text_sent is not None:
            lines.add_row("  sent", _said(turn.text_sent, style="dim"))
    elif turn.status == "pending":
        lines.add_row("  agent", _said(turn.reply_text or "(still replying)", style="dim"))
    elif turn.reply_text:
        lines.add_row("  agent", _said(turn.reply_text))
    else:
        lines.add_row("  agent", Text("(nothing said)" if turn.status else "(no reply)", style="dim"))
    out.print(lines)


def _said(text: str, *, style: str = "") -> Text:
    """Words someone said, their own lines kept."""
    return Text(printable(text, multiline=True), style=style)


def _quoted(text: str) -> str:
    return f"'{printable(text)}'"


def _status(status: str | None) -> Text:
    if status is None:
        return Text("-", style="dim")
    return Text(printable(status), style=_STATUS_STYLES.get(status, ""))


def _time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _cut(text: str) -> str:
    return text if len(text) <= _TOOL_CHARS else text[: _TOOL_CHARS - 1] + "…"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
