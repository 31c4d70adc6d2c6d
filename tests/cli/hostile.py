"""What would drive a terminal: the characters that must never reach it raw, and a backend that sends them."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Generator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from layercode_agent.protocol import SignatureError, verify

RAW_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]"
)
"""Characters that must never reach the terminal raw (newline and tab may, in text of several lines)."""

# What someone else's backend could send, which would retitle the window, clear the screen, overwrite its
# own line, start an 8-bit CSI, reverse the line and style itself, if the chat printed it raw.
ODD_REPLY = ["\x1b]0;owned\x07", "Odd", " \x1b[2J\r", "\x9b31m", " \u202eright", " [bold red]loud[/]\nnext line"]
ODD_SHOWN = r"\x1b]0;owned\x07Odd \x1b[2J\r\x9b31m \u202eright [bold red]loud[/]" + "\n        next line"


ODD_SECRET = "whsec_odd_backend"
"""The only webhook secret the backend accepts."""


class _OddBackend(BaseHTTPRequestHandler):
    """Answers every turn signed with `ODD_SECRET` with `ODD_REPLY`, odd data and an odd error.

    `/refuse` answers 401 with an odd reason; `/no-end` streams an event of an odd type and no `response.end`.
    """

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["content-length"]))
        body = json.loads(raw)
        try:
            verify(raw, self.headers.get("layercode-signature"), [ODD_SECRET])
        except SignatureError:
            self._send(401, "application/json", b'{"reason": "invalid signature"}')
            return
        if self.path == "/refuse":
            self._send(401, "application/json", json.dumps({"reason": "\x1b]0;owned\x07bad \x9b2J"}).encode())
        elif self.path == "/no-end":
            events = [{"type": "\x1b]0;owned\x07", "turn_id": body["turn_id"]}]
            self._send(200, "text/event-stream", b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events))
        elif body["type"] == "session.end":
            self._send(200, "application/json", b"{}")
        else:
            events = [{"type": "response.tts", "content": part, "turn_id": body["turn_id"]} for part in ODD_REPLY]
            events.append({"type": "response.data", "content": {"odd": "\x1b[2J\u202e"}, "turn_id": body["turn_id"]})
            events.append({"type": "response.error", "error": "\x1b]0;owned\x07", "turn_id": body["turn_id"]})
            events.append({"type": "response.end", "turn_id": body["turn_id"]})
            self._send(200, "text/event-stream", b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events))

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def odd_backend() -> Generator[str]:
    """Serve `_OddBackend` on 127.0.0.1 and yield its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OddBackend)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=30)
