"""`layercode-agent chat`: talk to any Layercode webhook backend from a terminal, as Layercode would.

Why: trying an agent through Layercode needs a tunnel, a dashboard and a microphone. This command speaks the
same protocol from a terminal through `layercode_agent.client.WebhookClient` (signed `session.start`,
`message` and `session.end` webhooks, the SSE answer read event by event), so what works here works behind
Layercode, against this server or anyone's.

Barge-in is done the way Layercode does it (docs "Keeping track of conversation history", summarised in
`/work/shared/layercode-protocol.md` section 2.4): the reply's HTTP request is closed mid-stream, and the
next `message` carries `interruption_context` with the words the caller heard, here the words shown.

How the terminal is driven: a thread reads standard input with `os.read` (no lock on `sys.stdin` that could
hang interpreter shutdown) and hands complete lines to the event loop, so a line typed while a reply
streams is noticed between two chunks. SIGINT is a loop signal handler, so Ctrl-C stops a reply instead of
killing the process. While a reply streams the terminal's echo is off, so what is typed does not mix with
the agent's words; the line is shown once Enter sends it. With standard input not a terminal (a pipe, a
file) nobody can barge in: lines wait for the reply to finish, and the end of input ends the session after
the last reply.

Whatever the backend sends (words, data, error bodies) and whatever is piped in is printed through
`printable`, inside a Rich `Text`: a control sequence in it is shown as an escape, never obeyed by the terminal.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any, Final, cast

import httpx
from pydantic import SecretStr
from rich.console import Console
from rich.text import Text

from ..client import Transcript, WebhookClient, interruption_context
from ..config import get_settings
from ._printable import printable

__all__ = ["run_chat"]

_LABEL_WIDTH: Final = len("agent › ")
_INDENT: Final = " " * _LABEL_WIDTH
_AGENT_LABEL: Final = Text("agent › ", style="bold magenta")
_USER_LABEL: Final = Text("you › ".rjust(_LABEL_WIDTH), style="bold cyan")
_TIMEOUT: Final = httpx.Timeout(60.0, connect=10.0)
"""Seconds to wait for the backend: 10 to connect, 60 between two events of a reply."""
_END_TIMEOUT: Final = 15.0
"""Seconds `session.end` may take before the command gives up on it."""


class _Interrupt:
    """Ctrl-C was pressed."""


class _EndOfInput:
    """Standard input is exhausted (Ctrl-D in a terminal)."""


_INTERRUPT: Final = _Interrupt()
_EOF: Final = _EndOfInput()
_Input = str | _Interrupt | _EndOfInput


class _ChatError(Exception):
    """A failure worth one line to the user (unreachable backend, refused webhook), never a traceback."""


def run_chat(*, url: str | None, secret: SecretStr, secret_source: str, conversation_id: str | None) -> int:
    """Hold a typed conversation with the backend at `url` and return the exit code.

    Args:
        url: The webhook URL; by default this project's server on 127.0.0.1 at the configured `PORT`.
        secret: The webhook secret to sign with (see `cli._secret.signing_secret`).
        secret_source: Where it came from, for the banner.
        conversation_id: Continue this conversation; by default a new one.

    Returns:
        0 when the session ended normally, 1 when the backend could not be reached or refused a webhook,
        130 when Ctrl-C cut the final `session.end` short.
    """
    out = Console(highlight=False, soft_wrap=True, emoji=False)
    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    url = url or f"http://127.0.0.1:{get_settings().port}/api/agent"
    chat = _Chat(url, secret, conversation_id, screen=_Screen(out), secret_source=secret_source)
    try:
        return asyncio.run(chat.run())
    except _ChatError as exc:
        chat.screen.newline()
        err.print(Text(printable(str(exc)), style="red"))
        return 1
    except KeyboardInterrupt:  # Only before or after the loop's own SIGINT handler is in place.
        return 130


# --- The conversation -------------------------------------------------------------------------------


@dataclass
class _Reply:
    """One streamed answer, as far as it got."""

    turn_id: str
    text: str = ""
    """Every `response.tts` content received, joined: exactly what was shown."""
    first_tts_ms: float | None = None
    end_ms: float | None = None
    """When `response.end` arrived; `None` if it never did."""


@dataclass
class _Outcome:
    """How a reply ended: on its own, or cut short by a line, Ctrl-C or the end of input."""

    line: str | None = None
    """A line typed during the reply, to send next."""
    eof: bool = False


class _Chat:
    """One session: the welcome, then typed turns until the end of input, then `session.end`."""

    def __init__(
        self, url: str, secret: SecretStr, conversation_id: str | None, *, screen: _Screen, secret_source: str
    ) -> None:
        self.url = url
        self.secret = secret
        self.conversation_id = conversation_id
        self.screen = screen
        self.secret_source = secret_source
        self.transcript = Transcript()
        self.fd = _stdin_fd()
        self.interactive = self.fd is not None and os.isatty(self.fd)
        self.echo = _TerminalEcho(self.fd if self.interactive else None)
        # The terminal echoes what is typed at the prompt; anywhere else the chat shows the line itself.
        self.echoed = self.interactive and screen.console.is_terminal
        self.interrupted: tuple[str, str] | None = None
        """The turn id and shown text of the last reply cut short, for the next `interruption_context`."""
        self._queue: asyncio.Queue[_Input] = asyncio.Queue()
        self._pending: asyncio.Task[_Input] | None = None
        self._backlog: deque[_Input] = deque()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        _start_reader(self.fd, loop, self._queue)
        handled = _on_sigint(loop, lambda: self._queue.put_nowait(_INTERRUPT))
        http = httpx.AsyncClient(timeout=_TIMEOUT)
        client = WebhookClient(self.url, self.secret, conversation_id=self.conversation_id, http=http)
        started = time.time()
        try:
            self.screen.banner(self.url, client.conversation_id, self.secret_source, self.interactive)
            await self._converse(client)
            return await self._end(client, started)
        finally:
            self.echo.restore()
            if handled:
                loop.remove_signal_handler(signal.SIGINT)
            if self._pending is not None:
                self._pending.cancel()
            await http.aclose()

    async def _converse(self, client: WebhookClient) -> None:
        outcome = await self._reply(client, client.body("session.start"))
        while not outcome.eof:
            if outcome.line is not None:
                text = outcome.line
                self.screen.user_line(text)
            else:
                # A line typed before the prompt appeared (while echo was off) was not echoed.
                early = bool(self._backlog) or (self._pending is not None and self._pending.done())
                self.screen.prompt()
                item = await self._next_input()
                if not isinstance(item, str):
                    self.screen.newline()
                    return
                if early or not self.echoed:
                    self.screen.typed(item)
                else:
                    self.screen.echoed()
                text = item
                if not text.strip():
                    continue
            self.transcript.add("user", text)
            fields: dict[str, Any] = {}
            if self.interrupted is not None:
                fields["interruption_context"] = interruption_context(*self.interrupted)
                self.interrupted = None
            outcome = await self._reply(client, client.body("message", text=text, **fields))

    async def _reply(self, client: WebhookClient, body: dict[str, Any]) -> _Outcome:
        """Stream one reply to the screen until it ends, or until a typed line, Ctrl-C or Ctrl-D cuts it short."""
        reply = _Reply(turn_id=str(body["turn_id"]))
        streaming = asyncio.create_task(self._stream(client, body, reply))
        started = time.perf_counter()
        self.echo.off()
        try:
            while True:
                getter = self._input_task()
                await asyncio.wait({streaming, getter}, return_when=asyncio.FIRST_COMPLETED)
                if streaming.done():
                    streaming.result()  # Raises what went wrong.
                    self.screen.finished(reply)
                    self.transcript.add("assistant", reply.text)
                    return _Outcome()
                item = self._take()
                if not self.interactive and not isinstance(item, _Interrupt):
                    self._backlog.append(item)  # Piped input waits for the reply; nobody is barging in.
                    continue
                streaming.cancel()  # Closes the HTTP request, as Layercode does on barge-in.
                with suppress(asyncio.CancelledError):
                    await streaming
                heard = reply.text.strip()
                self.interrupted = (reply.turn_id, heard)
                self.transcript.add("assistant", heard)
                elapsed = time.perf_counter() - started
                if isinstance(item, _EndOfInput):
                    self.screen.interrupted(heard, elapsed, "Ctrl-D")
                    return _Outcome(eof=True)
                if isinstance(item, _Interrupt) or not item.strip():
                    self.screen.interrupted(heard, elapsed, "Ctrl-C" if isinstance(item, _Interrupt) else "Enter")
                    return _Outcome()
                self.screen.interrupted(heard, elapsed, "you")
                return _Outcome(line=item)
        finally:
            self.echo.restore()
            if not streaming.done():
                streaming.cancel()
                with suppress(asyncio.CancelledError):
                    await streaming

    async def _stream(self, client: WebhookClient, body: dict[str, Any], reply: _Reply) -> None:
        self.screen.begin_reply()
        # `stream()` is an async generator: closing it (here, on cancellation) closes the HTTP request at once.
        events = cast(AsyncGenerator[tuple[float, dict[str, Any]]], client.stream(body))
        try:
            async with aclosing(events):
                async for at, event in events:
                    kind = event.get("type")
                    if kind == "response.tts":
                        if reply.first_tts_ms is None:
                            reply.first_tts_ms = at
                        content = str(event.get("content") or "")
                        reply.text += content
                        self.screen.words(content)
                    elif kind == "response.data":
                        self.screen.data(event.get("content"))
                    elif kind == "response.end":
                        reply.end_ms = at
                    else:
                        self.screen.unexpected(event)
        except httpx.HTTPStatusError as exc:
            raise _ChatError(_refused(self.url, exc.response)) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _ChatError(_unreachable(self.url, exc)) from None

    async def _end(self, client: WebhookClient, started: float) -> int:
        """Send `session.end` with the transcript, as Layercode does when a call ends; Ctrl-C gives up on it."""
        ending = asyncio.create_task(asyncio.wait_for(client.end(self.transcript, started_at=started), _END_TIMEOUT))
        while True:
            getter = self._input_task()
            await asyncio.wait({ending, getter}, return_when=asyncio.FIRST_COMPLETED)
            if ending.done():
                break
            if isinstance(self._take(), _Interrupt):
                ending.cancel()
                with suppress(asyncio.CancelledError):
                    await ending
                self.screen.meta("Stopped: session.end was not sent.", style="yellow")
                return 130
        try:
            response = ending.result()
        except TimeoutError:
            raise _ChatError(f"{self.url} did not acknowledge session.end within {_END_TIMEOUT:.0f} s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _ChatError(_unreachable(self.url, exc)) from None
        if response.status_code >= 400:
            raise _ChatError(_refused(self.url, response))
        self.screen.goodbye(len(self.transcript.entries))
        return 0

    # --- Input ------------------------------------------------------------------------------------------

    def _input_task(self) -> asyncio.Task[_Input]:
        """The one pending read of the next input (kept across waits, so nothing typed is ever lost)."""
        if self._pending is None:
            self._pending = asyncio.create_task(self._queue.get())
        return self._pending

    def _take(self) -> _Input:
        assert self._pending is not None and self._pending.done()
        item, self._pending = self._pending.result(), None
        return item

    async def _next_input(self) -> _Input:
        if self._backlog:
            return self._backlog.popleft()
        await self._input_task()
        return self._take()


# --- The terminal -----------------------------------------------------------------------------------


class _Screen:
    """What the person sees: `you ›` lines, the agent's words as they stream, dim lines about the protocol."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._open = False
        """Whether the cursor is not at the start of a line."""
        self._labelled = False
        """Whether the current reply's `agent ›` label is shown."""
        self._indent = False
        """Whether the agent's next words start a fresh line of their own (after a data or meta line)."""

    def banner(self, url: str, conversation_id: str, secret_source: str, interactive: bool) -> None:
        self.console.print(Text.assemble(("Chatting with ", "bold"), (printable(url), "bold"), " as Layercode would"))
        self.console.print(
            Text(printable(f"conversation {conversation_id} · signed with {secret_source}"), style="dim")
        )
        if interactive:
            keys = "Enter sends · typing during a reply interrupts it · Ctrl-C stops a reply · Ctrl-D ends the session"
            self.console.print(Text(keys, style="dim"))
        self.console.print()

    def prompt(self) -> None:
        self._write(_USER_LABEL)

    def typed(self, text: str) -> None:
        """Show a line the terminal did not echo (input from a pipe, or output not to a terminal)."""
        self._write(Text(printable(text)))
        self.newline()

    def echoed(self) -> None:
        """The terminal echoed the line and its Enter: the cursor is at the start of a line."""
        self._open = False

    def user_line(self, text: str) -> None:
        """Show a line typed during a reply (echo was off) as the next thing said."""
        self.newline()
        self._write(_USER_LABEL)
        self._write(Text(printable(text)))
        self.newline()

    def begin_reply(self) -> None:
        self._labelled = self._indent = False

    def words(self, content: str) -> None:
        content = printable(content, multiline=True)
        if not content:
            return
        if not self._labelled:
            self.newline()
            self._write(_AGENT_LABEL)
            self._labelled = True
            content = content.lstrip()
        elif self._indent:
            self._write(Text(_INDENT))
            content = content.lstrip()
        self._indent = False
        self._write(Text(content.replace("\n", "\n" + _INDENT)))

    def data(self, content: Any) -> None:
        self.meta(f"data {json.dumps(content, ensure_ascii=False)}")

    def unexpected(self, event: dict[str, Any]) -> None:
        if event.get("type") == "response.error":
            self.meta(f"response.error: {event.get('error')}", style="red")
        else:
            self.meta(f"unexpected event {json.dumps(event, ensure_ascii=False)}", style="yellow")

    def finished(self, reply: _Reply) -> None:
        if not self._labelled:
            self.newline()
            self._write(_AGENT_LABEL)
            self._write(Text("(nothing said)", style="dim"))
        parts: list[str] = []
        if reply.first_tts_ms is not None:
            parts.append(f"first word {_duration(reply.first_tts_ms)}")
        if reply.end_ms is not None:
            parts.append(f"total {_duration(reply.end_ms)}")
            self.meta(" · ".join(parts))
        else:
            self.meta(" · ".join([*parts, "the stream closed without response.end"]), style="yellow")

    def interrupted(self, heard: str, seconds: float, by: str) -> None:
        words = len(heard.split())
        shown = f"after {words} word{'' if words == 1 else 's'}" if words else "before any word"
        self.meta(f"interrupted ({by}) {shown} · {seconds:.1f} s")

    def meta(self, text: str, *, style: str = "dim") -> None:
        self.newline()
        self._write(Text(_INDENT + printable(text), style=style))
        self.newline()
        self._indent = True

    def goodbye(self, lines: int) -> None:
        self.newline()
        self.console.print(
            Text(f"Session ended: session.end sent with {lines} transcript line{'' if lines == 1 else 's'}. Bye!")
        )

    def newline(self) -> None:
        if self._open:
            self.console.print()
            self._open = False

    def _write(self, text: Text) -> None:
        self.console.print(text, end="")
        self._open = not text.plain.endswith("\n")


def _duration(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


class _TerminalEcho:
    """Turns the terminal's echo off while a reply streams, so typing does not mix with the agent's words."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None
        if fd is not None and sys.platform != "win32":
            import termios

            with suppress(termios.error):
                self._saved = termios.tcgetattr(fd)

    def off(self) -> None:
        if self.fd is not None and self._saved is not None and sys.platform != "win32":
            import termios

            quiet = list(self._saved)
            quiet[3] = quiet[3] & ~termios.ECHO
            with suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSANOW, quiet)

    def restore(self) -> None:
        if self.fd is not None and self._saved is not None and sys.platform != "win32":
            import termios

            with suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)


def _stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno() if sys.stdin is not None else None
    except (OSError, ValueError):  # Closed, or replaced by an object without a descriptor.
        return None


def _start_reader(fd: int | None, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[_Input]) -> None:
    """Feed `queue` with the lines of `fd`, then `_EOF`, from a daemon thread."""

    def put(item: _Input) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # The loop is closed: the chat is over.
            return False
        return True

    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"

    def read() -> None:
        decoder = codecs.getincrementaldecoder(encoding)("replace")
        pending = ""
        while True:
            try:
                chunk = os.read(fd, 4096) if fd is not None else b""
            except OSError:
                chunk = b""
            if not chunk:
                pending += decoder.decode(b"", final=True)
                if pending and not put(pending.removesuffix("\r")):
                    return
                put(_EOF)
                return
            pending += decoder.decode(chunk)
            *lines, pending = pending.split("\n")
            for line in lines:
                if not put(line.removesuffix("\r")):
                    return

    threading.Thread(target=read, name="layercode-chat-stdin", daemon=True).start()


def _on_sigint(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> bool:
    try:
        loop.add_signal_handler(signal.SIGINT, callback)
    except (NotImplementedError, RuntimeError):  # Windows, or not the main thread: Ctrl-C stays KeyboardInterrupt.
        return False
    return True


# --- Errors, one line each --------------------------------------------------------------------------


def _unreachable(url: str, exc: Exception) -> str:
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return f"invalid URL {url!r}: {exc}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"cannot reach {url}: is `layercode-agent serve` running?"
    if isinstance(exc, httpx.TimeoutException):
        return f"{url} stopped answering (no event for {_TIMEOUT.read:.0f} s)"
    return f"the connection to {url} broke: {str(exc) or type(exc).__name__}"


def _refused(url: str, response: httpx.Response) -> str:
    status = response.status_code
    reason = ""
    try:
        answer = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        reason = response.text.strip()[:200]
    else:
        if isinstance(answer, dict):
            fields = cast(dict[str, Any], answer)
            found = fields.get("reason") or fields.get("error") or fields.get("detail")
            reason = str(found) if found else ""
    because = f" ({reason})" if reason else ""
    if status == 401:
        return f"401: invalid signature – check --secret, --secret-file or LAYERCODE_WEBHOOK_SECRET{because}"
    if status in (404, 405):
        return f"{status} from {url}: is this the webhook URL (usually …/api/agent)?{because}"
    return f"{status} from {url}{because or ': ' + response.reason_phrase}"
