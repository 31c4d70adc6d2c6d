"""Speak to a backend exactly as Layercode does: signed JSON webhooks out, SSE parsed back.

Used by the tests and by the local tools, so what is tried locally is what production gets. Works
against any backend that implements the protocol, not only this one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import SecretStr

from .protocol import SIGNATURE_HEADER, SSEParser, sign

__all__ = ["Transcript", "TurnResult", "WebhookClient", "interruption_context"]


def interruption_context(assistant_turn_id: str | None, text_heard: str) -> dict[str, Any]:
    """The `interruption_context` Layercode puts on the `message` after a barge-in.

    Args:
        assistant_turn_id: The turn whose reply was cut off.
        text_heard: The words of that reply the caller heard (or saw) before interrupting.
    """
    context: dict[str, Any] = {
        "previous_turn_interrupted": True,
        "words_heard": len(text_heard.split()),
        "text_heard": text_heard,
    }
    if assistant_turn_id is not None:
        context["assistant_turn_id"] = assistant_turn_id
    return context


@dataclass
class Transcript:
    """A session's transcript in the shape `session.end` carries: `{role, text, timestamp}` entries, ms timestamps."""

    entries: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])

    def add(self, role: str, text: str) -> None:
        """Record what `"user"` or `"assistant"` said, stamped now; empty text is skipped."""
        if text.strip():
            self.entries.append({"role": role, "text": text.strip(), "timestamp": int(time.time() * 1000)})


@dataclass
class TurnResult:
    """One streamed answer as the caller would experience it."""

    status: int
    events: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    arrival_ms: list[float] = field(default_factory=list[float])
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict[str, str])

    @property
    def text(self) -> str:
        """Everything that would be spoken, joined."""
        return "".join(str(event.get("content", "")) for event in self.events if event.get("type") == "response.tts")

    @property
    def first_tts_ms(self) -> float | None:
        """Milliseconds from sending the webhook to the first `response.tts`."""
        for event, at in zip(self.events, self.arrival_ms, strict=True):
            if event.get("type") == "response.tts":
                return at
        return None

    @property
    def types(self) -> list[str]:
        """The event types in arrival order."""
        return [str(event.get("type")) for event in self.events]


class WebhookClient:
    """Sends webhooks for one conversation (keeps `conversation_id`, mints `turn_id`s)."""

    def __init__(
        self,
        url: str,
        secret: str | SecretStr,
        *,
        conversation_id: str | None = None,
        session_id: str | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.url = url
        # Kept wrapped, so a repr or a traceback of the client never shows it; `sign` unwraps it.
        self.secret = secret if isinstance(secret, SecretStr) else SecretStr(secret)
        self.conversation_id = conversation_id or f"lc_conv_{uuid.uuid4().hex[:16]}"
        self.session_id = session_id or f"lc_conn_{uuid.uuid4().hex[:16]}"
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._own_http = http is None

    async def __aenter__(self) -> WebhookClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._own_http:
            await self._http.aclose()

    def body(self, event_type: str, **fields: Any) -> dict[str, Any]:
        """A webhook body for this conversation, as Layercode builds it."""
        body: dict[str, Any] = {
            "type": event_type,
            "session_id": self.session_id,
            "conversation_id": self.conversation_id,
        }
        if event_type in ("message", "session.start", "data") and "turn_id" not in fields:
            body["turn_id"] = f"turn_{uuid.uuid4().hex[:12]}"
        body.update(fields)
        return body

    def signed(self, raw: bytes, *, timestamp: int | None = None) -> dict[str, str]:
        """Headers Layercode sends with `raw`."""
        return {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(
                raw, self.secret, timestamp=timestamp if timestamp is not None else int(time.time())
            ),
        }

    async def post(self, body: dict[str, Any] | bytes, *, headers: dict[str, str] | None = None) -> httpx.Response:
        """Send one webhook and read the whole answer."""
        raw = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        return await self._http.post(
            self.url, content=raw, headers=headers if headers is not None else self.signed(raw)
        )

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[tuple[float, dict[str, Any]]]:
        """Send one webhook and yield `(ms since sent, event)` as each SSE event arrives."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        started = time.perf_counter()
        async with self._http.stream("POST", self.url, content=raw, headers=self.signed(raw)) as response:
            if response.status_code != 200:
                await response.aread()
                raise httpx.HTTPStatusError(
                    f"{response.status_code}: {response.text}", request=response.request, response=response
                )
            parser = SSEParser()
            async for chunk in response.aiter_raw():
                for event in parser.feed(chunk):
                    yield (time.perf_counter() - started) * 1000, event

    async def turn(self, body: dict[str, Any]) -> TurnResult:
        """Send one webhook and collect the whole streamed answer with arrival times."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        started = time.perf_counter()
        async with self._http.stream("POST", self.url, content=raw, headers=self.signed(raw)) as response:
            result = TurnResult(status=response.status_code, headers=dict(response.headers))
            parser = SSEParser()
            chunks: list[bytes] = []
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
                for event in parser.feed(chunk):
                    result.events.append(event)
                    result.arrival_ms.append((time.perf_counter() - started) * 1000)
            result.body = b"".join(chunks)
        return result

    async def say(self, text: str, **fields: Any) -> TurnResult:
        """Send a `message` webhook with the caller's words."""
        return await self.turn(self.body("message", text=text, **fields))

    async def start(self, **fields: Any) -> TurnResult:
        """Send `session.start`."""
        return await self.turn(self.body("session.start", **fields))

    async def data(self, data: Any, **fields: Any) -> httpx.Response:
        """Send a `data` webhook (client data); the answer is a JSON `response.data`."""
        return await self.post(self.body("data", data=data, **fields))

    async def end(self, transcript: Transcript | None = None, *, started_at: float | None = None) -> httpx.Response:
        """Send `session.end` with the transcript, as Layercode does when a session closes."""
        now = time.time()
        fields: dict[str, Any] = {"transcript": transcript.entries if transcript else []}
        if started_at is not None:
            fields["duration"] = int((now - started_at) * 1000)
        return await self.post(self.body("session.end", **fields))
