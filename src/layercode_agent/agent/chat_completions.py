"""A lean pydantic-ai model for streaming Chat Completions from any OpenAI-compatible server.

`ChatCompletionsModel` speaks `POST {base_url}/chat/completions` with `stream: true` itself: one
keep-alive `aiohttp.ClientSession` per model, the SSE bytes split into events by hand, each event's JSON
decoded straight into dicts, and each delta handed to pydantic-ai's `ModelResponsePartsManager`, the
same seam `OpenAIChatModel` uses. It leaves out what a voice turn pays for on every token with the
SDK: a pydantic model built for every chunk, the SDK's SSE decoder and its retry loop.

Decoder, chosen by measurement (ns per chunk on this machine, best of 5 runs of 200,000, with the
machine shared; a text delta / a tool-call argument delta / the usage chunk, OpenAI's field set):

    json.loads            3,987 / 4,520 / 6,029
    orjson.loads            967 / 1,289 / 1,610
    msgspec (untyped)       874 / 1,424 / 1,458
    msgspec (typed Struct)  554 / 1,289 /   846
    jiter.from_json         940 / 1,262 / 1,695

The untyped Rust decoders are within noise of each other, four times faster than `json`. A typed
msgspec schema saves about 0.4 us more per text delta (some 25 us on a 60-token reply), not worth a
new dependency and a strict schema that would reject the looser chunks some compatible servers send
(content as a list of parts, a missing tool-call index), so this uses jiter, already installed as a
dependency of the OpenAI SDK that pydantic-ai's `openai` extra brings.

Request bodies are plain dicts built from the pydantic-ai messages, with no type-driven transform
walking the history: mapping 40 exchanges (a user prompt, a tool call, its result and a reply each,
160 messages) took 0.19 to 0.28 ms; with `MessageCache` keeping each earlier message's mapped form,
the whole body takes 0.09 ms, 0.13 ms with its JSON encoding (0.003 ms with no history).

CPU per 60-token reply from the bench's fake LLM (through `bench.layers`' harness, one core, 2
earlier exchanges): pydantic-ai's model layer 28 ms with `OpenAIChatModel`, 5.7 ms with this one,
tokens back to back (bare httpx reading the SSE lines: about 3.6 ms); with tokens 10 ms apart, where
every wake-up is dear in this VM, 70 ms against 48 ms (bare httpx about 30 ms).

Text can skip the agent's stream. pydantic-ai passes each event a model yields through some ten
nested async generators (special tokens, continuation, error decoding, capabilities, dispatch, the
final-result and part-end guards) before a run's reader sees it. While the code reading a run puts a
callable in `DIRECT_TEXT` (only around a model request: never while tools run, so a sub-agent's
text is never spoken), a response whose text pydantic-ai would not rewrite (no special-token
restoring; embedded `<think>` sections still go to its parts manager) hands each text delta to it
the moment it is parsed, and yields that text to the agent in one piece when the part ends: before a
tool call or reasoning, and at the end of the stream. The agent's record of the response is the
same; the reader knows a response's text came directly from the first call, and skips that
response's text events.

The request can leave before the agent asks for it. pydantic-ai spends 3 to 5 ms of CPU setting up a
run and its first model request (capabilities, the graph, the request's preparation) before
`request_stream` is called, and the caller waits for all of it. `open_early` sends, as soon as the
turn knows its history, the request the agent's first one will most likely be: the last turn's first
request with this turn's messages. The agent's own request takes it only if its body and headers are
the same bytes, so the model always answers exactly what the agent asked; otherwise it is closed at
once, and after three misses in a row (an agent whose instructions change every turn) none is sent.

Retries suit a voice call: a connection that could not be opened, or a 5xx/429 answer before any
byte of the stream, is retried once at once; anything else raises, and the caller hears the apology
instead of seconds of silence. An early request counts as the first attempt.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, cast

import aiohttp
import aiohttp.helpers as aiohttp_helpers
import httpx
import jiter
import pydantic_core
from pydantic_ai import ModelAPIError, ModelHTTPError, UserError
from pydantic_ai._model_errors import (  # pyright: ignore[reportPrivateUsage]
    connection_error,
    openai_compatible_category,
    stream_error,
)
from pydantic_ai.messages import (
    BinaryContent,
    FinishReason,
    ImageUrl,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponseStreamEvent,
    PartStartEvent,
    SystemPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import (
    Model,
    ModelRequestParameters,
    StreamedResponse,
    check_allow_model_requests,
    get_user_agent,
)
from pydantic_ai.models._tool_choice import resolve_tool_choice  # pyright: ignore[reportPrivateUsage]
from pydantic_ai.profiles import ModelProfile
from pydantic_ai.profiles.openai import openai_model_profile
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext, ToolDefinition
from pydantic_ai.usage import RequestUsage
from yarl import URL

from ._prices import remember_unpriced_models

__all__ = [
    "DEFAULT_BASE_URL",
    "DIRECT_TEXT",
    "EARLY_REQUEST",
    "ChatCompletionsModel",
    "ChatCompletionsStreamedResponse",
    "EarlyRequest",
    "MessageCache",
    "map_messages",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"

DIRECT_TEXT: ContextVar[Callable[[str], None] | None] = ContextVar("layercode_agent_direct_text", default=None)
"""Where a `ChatCompletionsModel` stream hands each text delta at once, if set (see the module docstring)."""

EARLY_REQUEST: ContextVar[EarlyRequest | None] = ContextVar("layercode_agent_early_request", default=None)
"""A request `ChatCompletionsModel.open_early` sent for this turn, which its first request takes if it is the same."""

_EARLY_MISSES = 3
"""Early requests in a row the agent's own first request did not match, after which none is sent any more."""

# As pydantic-ai's Chat Completions mapping has it.
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_call",
    "content_filter": "content_filter",
    "function_call": "tool_call",
}
_DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=600.0)
"""Five seconds to connect, then up to 600 s between two reads: a long reply is never cut, a dead server is."""
_AFTER_DONE = 0.5
"""Seconds to wait for a stream's body to end after its `[DONE]`, so its connection is kept (see `_read_to_the_end`)."""
# Failures that happen before the server answered anything; a retry cannot repeat a spoken word.
_RETRYABLE_TRANSPORT = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
_READ_ERRORS = (aiohttp.ClientError, TimeoutError)
"""What reading a stream's body may raise: the connection lost, a broken chunked body, a read timeout."""
_PASSED_SETTINGS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
}


@dataclass(frozen=True)
class _Template:
    body: dict[str, Any]
    instructions: Sequence[str]
    headers: dict[str, str]
    timeout: aiohttp.ClientTimeout | None


@dataclass(eq=False)
class EarlyRequest:
    """A request sent before the agent asked for it (`ChatCompletionsModel.open_early`)."""

    content: bytes
    headers: dict[str, str]
    task: asyncio.Task[aiohttp.ClientResponse] | None
    """`None`: nothing was sent (there was nothing to go by yet)."""
    taken: bool = False
    """Whether the agent's request took it, or it was discarded."""
    used: bool = False
    """Whether the agent's request took it: its answer is the agent's."""
    sent_at: float | None = None
    """`time.perf_counter()` when it was on the wire (for the turn's `llm_request` stage)."""

    def discard(self) -> None:
        """Close it if the agent's request did not take it: the server sees the hang-up at once."""
        if self.taken:
            return
        self.taken = True
        if self.task is not None:
            self.task.add_done_callback(_close_early)
            self.task.cancel()


def _close_early(task: asyncio.Task[aiohttp.ClientResponse]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class ChatCompletionsModel(Model):
    """Streaming Chat Completions over one shared keep-alive HTTP client.

    Close it with `await model.aclose()` (or `async with model:`) when the process is done with it.
    """

    def __init__(
        self,
        model_name: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        session: aiohttp.ClientSession | None = None,
        provider_name: str = "openai",
        settings: ModelSettings | None = None,
        profile: ModelProfile | None = None,
    ) -> None:
        self._model_name = model_name
        self._base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._url = f"{self._base_url}/chat/completions"
        self._provider_name = provider_name
        self._headers = {"content-type": "application/json", "user-agent": get_user_agent()}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._session = session
        self._owns_session = session is None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._route = _Route()
        self._cache = MessageCache()
        self._template: _Template | None = None
        """How the last turn's first request was made, but for its messages (see `open_early`)."""
        self._early_misses = 0
        super().__init__(settings=settings, profile=profile)
        remember_unpriced_models()

    def __repr__(self) -> str:
        return f"ChatCompletionsModel({self._model_name!r}, base_url={self._base_url!r})"

    @property
    def model_name(self) -> str:
        """The model name sent in each request; a stream reports the one the server answered with."""
        return self._model_name

    @property
    def system(self) -> str:
        """The provider name, for telemetry and prices."""
        return self._provider_name

    @property
    def base_url(self) -> str:
        """The server's base URL, without `/chat/completions`."""
        return self._base_url

    def _provider_model_profile(self) -> ModelProfile:
        return openai_model_profile(self._model_name)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The keep-alive session every request of this model shares, made on first use in the running loop.

        aiohttp rather than httpx, by measurement: 100 concurrent 60-token streams from the bench's fake
        LLM cost 1.6 to 2.3 ms of CPU each with aiohttp, 33 to 35 ms with httpx, whose connection pool
        walks every connection (a readability syscall for each idle one) on every request and every close,
        and whose reads cross a dozen layers per chunk. No limit on connections: one per concurrent turn.
        The proxy (`HTTPS_PROXY`, `NO_PROXY`, as httpx reads them) and, for a server without an API key,
        `~/.netrc` credentials are read once here: aiohttp's `trust_env` reads both again on every
        request, in two trips to a thread (measured under the bench: 3% of a core, plus the hops).
        No cookies are kept: an LLM API is stateless.
        """
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=_DEFAULT_TIMEOUT,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._session_loop = loop
            self._owns_session = True
            self._route = _route_from_env(self._url, with_key="authorization" in self._headers)
        return self._session

    async def aclose(self) -> None:
        """Close the HTTP session if this model made it (its keep-alive connections with it)."""
        if self._session is not None and self._owns_session and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> ChatCompletionsModel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        """One response, read from a stream."""
        reset = DIRECT_TEXT.set(None)  # Whoever asks for a whole response wants none of it spoken.
        try:
            async with self.request_stream(messages, model_settings, model_request_parameters) as stream:
                async for _ in stream:
                    pass
        finally:
            DIRECT_TEXT.reset(reset)
        return stream.get()

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncGenerator[StreamedResponse]:
        """Open a streamed request; leaving the block closes its HTTP stream, also on cancellation."""
        check_allow_model_requests()
        settings, params = self.prepare_request(model_settings, model_request_parameters)
        settings = settings or ModelSettings()
        instructions = self._instructions(messages, params)
        body = self.build_body(messages, settings, params, instructions)
        early = EARLY_REQUEST.get()
        if early is not None and not early.taken:  # A turn's first request: the next turn's is made like it.
            headers, timeout = self._request_headers(settings), _timeout(settings.get("timeout"))
            self._template = _Template(body, instructions, headers, timeout)
        response = await self._open(body, settings, early)
        try:
            yield ChatCompletionsStreamedResponse(
                model_request_parameters=params,
                _model_name=self._model_name,
                _provider_name=self._provider_name,
                _provider_url=self._base_url,
                _http=response,
                _think_tags=self.profile.get("thinking_tags"),
            )
        finally:
            # Also on cancellation: a response not read to its end drops its connection, so the server
            # sees the hang-up at once; one read to its end gives the connection back for the next request.
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    def build_body(
        self,
        messages: Sequence[ModelMessage],
        settings: ModelSettings,
        params: ModelRequestParameters,
        instructions: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """The JSON body of one streamed request (public so tests and benchmarks can look at it)."""
        if instructions is None:
            instructions = self._instructions(messages, params)
        body: dict[str, Any] = {
            "model": self._model_name,
            "messages": map_messages(messages, instructions, self._cache),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tools, tool_choice = _tools(settings, params)
        if tools:
            body["tools"] = tools
            body["tool_choice"] = tool_choice
            if (parallel := settings.get("parallel_tool_calls")) is not None:
                body["parallel_tool_calls"] = parallel
        if params.output_mode == "native" and (output := params.output_object) is not None:
            schema: dict[str, Any] = {"name": output.name or "final_result", "schema": output.json_schema}
            if output.description:
                schema["description"] = output.description
            if output.strict is not None:
                schema["strict"] = output.strict
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif params.output_mode == "prompted" and self.profile.get("supports_json_object_output", False):
            body["response_format"] = {"type": "json_object"}
        if (max_tokens := settings.get("max_tokens")) is not None:
            # As pydantic-ai's model: OpenAI wants `max_completion_tokens` (its reasoning models refuse
            # `max_tokens`), some compatible servers only know `max_tokens`; the profile says which.
            if self.profile.get("openai_chat_supports_max_completion_tokens", True):
                body["max_completion_tokens"] = max_tokens
            else:
                body["max_tokens"] = max_tokens
        if stop := settings.get("stop_sequences"):
            body["stop"] = stop
        for key, wire in _PASSED_SETTINGS.items():
            if (value := settings.get(key)) is not None:
                body[wire] = value
        if extra := settings.get("extra_body"):
            body.update(cast(dict[str, Any], extra))
        return body

    def _instructions(self, messages: Sequence[ModelMessage], params: ModelRequestParameters) -> list[str]:
        return [part.content for part in self._get_instruction_parts(messages, params) or [] if part.content]

    async def open_early(self, messages: Sequence[ModelMessage]) -> EarlyRequest | None:
        """Send now the request the agent's first one of this turn will most likely be.

        The agent spends milliseconds on setting up its run before it asks for the model; the caller
        waits for every one of them. The guess is the last turn's first request with `messages`
        (the history as the agent will be given it) in place of its messages: the same instructions,
        tools and settings. Put the result in `EARLY_REQUEST` for the run: its first request takes the
        early one only if its body and headers are byte for byte the same, so what the model answers
        is always what the agent asked; otherwise the early request is closed at once. After a few
        misses in a row (instructions that change every turn, say) no early request is sent any more,
        and this returns `None`. Before the first turn there is nothing to go by: the handle then
        sends nothing, and only has the turn's first request kept as the next turn's guess.
        Call `EarlyRequest.discard()` when the run is over.
        """
        template = self._template
        if self._early_misses >= _EARLY_MISSES:
            return None
        if template is None:
            return EarlyRequest(b"", {}, None)
        body = dict(template.body)  # The same keys in the same order: the bytes match when the messages do.
        body["messages"] = map_messages(messages, template.instructions, self._cache)
        content = pydantic_core.to_json(body)
        task = asyncio.get_running_loop().create_task(self._post(content, template.headers, template.timeout))
        # Two turns of the loop: the request starts, then (aiohttp writes a body in a task of its own before
        # Python 3.12) its body goes out; on a kept-alive connection it is on the wire before this returns,
        # not after the agent's set-up, which awaits nothing for milliseconds.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return EarlyRequest(content, template.headers, task, sent_at=time.perf_counter())

    def _request_headers(self, settings: ModelSettings) -> dict[str, str]:
        if extra_headers := settings.get("extra_headers"):
            return {**self._headers, **extra_headers}
        return self._headers

    async def _post(
        self, content: bytes, headers: dict[str, str], limits: aiohttp.ClientTimeout | None
    ) -> aiohttp.ClientResponse:
        session = self.session
        route = self._route
        return await session.post(
            self._url,
            data=content,
            headers=headers,
            timeout=limits,
            proxy=route.proxy,
            proxy_auth=route.proxy_auth,
            auth=route.auth,
        )

    async def _open(
        self, body: dict[str, Any], settings: ModelSettings, early: EarlyRequest | None = None
    ) -> aiohttp.ClientResponse:
        """Send the request and return the response once its head says 200; at most one immediate retry.

        An `early` request made for the same body and headers is the first attempt, already under way.
        """
        headers = self._request_headers(settings)
        timeout = _timeout(settings.get("timeout"))
        content = pydantic_core.to_json(body)
        if early is None or early.taken or early.task is None:
            early = None
        elif early.content == content and early.headers == headers:
            self._early_misses = 0
        else:
            self._early_misses += 1
            early.discard()
            early = None
        # `max_retries: 0` makes a single attempt; more than one retry is never made.
        attempts = 1 if settings.get("max_retries") == 0 else 2
        for attempt in range(1, attempts + 1):
            try:
                if attempt == 1 and early is not None and early.task is not None:
                    early.taken = early.used = True
                    response = await early.task
                else:
                    response = await self._post(content, headers, timeout)
            except TimeoutError as exc:
                raise connection_error(self._model_name, _message(exc), exc, timeout=True) from exc
            except _RETRYABLE_TRANSPORT as exc:
                if attempt < attempts:
                    continue
                raise connection_error(self._model_name, _message(exc), exc, timeout=False) from exc
            except aiohttp.ClientError as exc:
                raise connection_error(self._model_name, _message(exc), exc, timeout=False) from exc
            if response.status < 400:
                return response
            try:
                raw = await response.read()
            except _READ_ERRORS:
                raw = b""
            finally:
                response.release()
            if attempt < attempts and (response.status >= 500 or response.status == 429):
                continue
            raise self._status_error(response, raw)
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises

    def _status_error(self, response: aiohttp.ClientResponse, raw: bytes) -> ModelHTTPError:
        body: object = raw.decode(errors="replace") or None
        try:
            parsed: object = jiter.from_json(raw) if raw else None
        except ValueError:
            parsed = None
        code = error_type = message = None
        if isinstance(parsed, dict):
            error: object = cast(dict[str, Any], parsed).get("error", parsed)
            body = error
            if isinstance(error, dict):
                error = cast(dict[str, Any], error)
                code = _str_or_none(error.get("code"))
                error_type = _str_or_none(error.get("type"))
                message = _str_or_none(error.get("message"))
        category = openai_compatible_category(response.status, code, error_type, message)
        return ModelHTTPError.for_category(
            category,
            status_code=response.status,
            model_name=self._model_name,
            body=body,
            headers=dict(response.headers),
            provider_error_code=code,
            provider_error_type=error_type,
        )


@dataclass
class ChatCompletionsStreamedResponse(StreamedResponse):
    """The events of one Chat Completions stream, parsed from its SSE bytes."""

    _model_name: str
    _provider_name: str
    _provider_url: str
    _http: aiohttp.ClientResponse
    _think_tags: tuple[str, str] | None = None
    _timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    _usage_received: bool | None = field(default=False, init=False)
    _text_generation: int = field(default=0, init=False)
    _direct: Callable[[str], None] | None = field(default=None, init=False)
    _held: list[str] = field(default_factory=list[str], init=False)
    _thinking: bool = field(default=False, init=False)
    """Text handed to `_direct` and not yet to the parts manager."""

    async def close_stream(self) -> None:
        """Close the HTTP response, which drops its connection."""
        self._http.close()

    def _get_event_iterator(self) -> AsyncIterator[ModelResponseStreamEvent]:
        if self._parts_manager.special_token_restorer is None:
            self._direct = DIRECT_TEXT.get()  # Nothing pydantic-ai would rewrite: the text may skip its stream.
        return self._parsed() if self._direct is None else self._pumped()

    async def _pumped(self) -> AsyncIterator[ModelResponseStreamEvent]:
        """The events of `_parsed`, read in a task of their own (when text goes to `DIRECT_TEXT`).

        Resuming a coroutine resumes every frame it awaits in: read in the run's own task, each
        network read would wake pydantic-ai's dozen stream layers, whether or not it yields an event.
        The pump wakes only itself per read; this generator wakes when there is an event to yield.
        """
        ready: asyncio.Queue[ModelResponseStreamEvent | BaseException | None] = asyncio.Queue()
        pump = asyncio.get_running_loop().create_task(self._pump(ready))
        try:
            while (item := await ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not pump.done():
                pump.cancel()
                await asyncio.wait([pump])  # Its HTTP read is over before the stream is closed.

    async def _pump(self, ready: asyncio.Queue[ModelResponseStreamEvent | BaseException | None]) -> None:
        try:
            async for event in self._parsed():
                ready.put_nowait(event)
        except Exception as exc:
            ready.put_nowait(exc)
        else:
            ready.put_nowait(None)

    async def _parsed(self) -> AsyncIterator[ModelResponseStreamEvent]:
        finished = False
        lines = _sse_data(self._http)
        try:
            async for data in lines:
                if data == b"[DONE]":
                    break
                chunk = jiter.from_json(data)
                if not isinstance(chunk, dict):
                    continue
                chunk = cast(dict[str, Any], chunk)
                for event in self._map_chunk(chunk):
                    yield event
                finished = finished or self.finish_reason is not None
            else:
                lines = None  # The body ended: nothing is left to read.
            for event in self._release_text():
                yield event
            if lines is not None:
                await _read_to_the_end(lines)
        except ValueError as exc:
            raise ModelAPIError(self._model_name, f"the LLM sent a chunk that is not JSON: {exc}") from exc
        except _READ_ERRORS as exc:
            if self.cancelled:
                raise
            raise connection_error(self._model_name, _message(exc), exc, timeout=isinstance(exc, TimeoutError)) from exc
        if not finished and not self.cancelled:
            self.finish_reason = "stop"  # Some compatible servers never send one.

    def _map_chunk(self, chunk: dict[str, Any]) -> Iterator[ModelResponseStreamEvent]:
        if (error := chunk.get("error")) is not None:
            message = error.get("message") if isinstance(error, dict) else None
            raise stream_error(self._model_name, _str_or_none(message) or str(error), error)
        if chunk_id := chunk.get("id"):
            self.provider_response_id = chunk_id
        if model := chunk.get("model"):
            self._model_name = model
        if (usage := chunk.get("usage")) is not None:
            self._add_usage(_usage(usage), reported=True)
        choices = chunk.get("choices")
        if not choices:
            return
        choice = choices[0]
        if reason := choice.get("finish_reason"):
            self.finish_reason = _FINISH_REASONS.get(reason)
        delta = choice.get("delta")
        if not delta:
            return
        parts = self._parts_manager
        for name in ("reasoning_content", "reasoning"):
            if isinstance(reasoning := delta.get(name), str) and reasoning:
                yield from self._release_text()
                yield from parts.handle_thinking_delta(
                    vendor_part_id=name, id=name, content=reasoning, provider_name=self._provider_name
                )
                break
        content = delta.get("content")
        if isinstance(content, list):  # Some servers stream content as a list of parts.
            content = "".join(
                str(part.get("text", "")) for part in cast(list[dict[str, Any]], content) if isinstance(part, dict)
            )
        if content:
            tags = self._think_tags
            if (direct := self._direct) is None:
                yield from parts.handle_text_delta(
                    vendor_part_id=("content", self._text_generation), content=content, thinking_tags=tags
                )
            elif not self._thinking and (tags is None or content != tags[0]):
                direct(content)  # To the reader now; to the agent when the part ends.
                self._held.append(content)
            else:  # Embedded thinking (`<think>` as one token, up to `</think>`): the parts manager's to split.
                yield from self._release_text()
                self._thinking = tags is not None and content != tags[1]
                yield from parts.handle_text_delta(
                    vendor_part_id=("content", self._text_generation), content=content, thinking_tags=self._think_tags
                )
        if tool_calls := delta.get("tool_calls"):
            yield from self._release_text()
            for call in tool_calls:
                function = call.get("function") or {}
                for event in parts.handle_tool_call_delta_events(
                    vendor_part_id=("tool", call.get("index", 0)),
                    tool_name=function.get("name"),
                    args=function.get("arguments"),
                    tool_call_id=call.get("id"),
                ):
                    if isinstance(event, PartStartEvent):
                        self._text_generation += 1  # Text after a tool call is a new text part.
                    yield event

    def _release_text(self) -> Iterator[ModelResponseStreamEvent]:
        """The text handed to `DIRECT_TEXT` since the last release, to the agent as one delta."""
        if self._held:
            text = "".join(self._held)
            self._held.clear()
            yield from self._parts_manager.handle_text_delta(
                vendor_part_id=("content", self._text_generation), content=text
            )

    @property
    def model_name(self) -> str:
        """The model name sent in each request; a stream reports the one the server answered with."""
        return self._model_name

    @property
    def provider_name(self) -> str:
        """The provider name."""
        return self._provider_name

    @property
    def provider_url(self) -> str:
        """The server's base URL."""
        return self._provider_url

    @property
    def timestamp(self) -> datetime:
        """When the stream was opened."""
        return self._timestamp


async def _read_to_the_end(lines: AsyncGenerator[bytes]) -> None:
    """Read what follows `[DONE]` (the chunked body's last chunk, usually in the same read), briefly.

    A body read to its end lets the HTTP client keep the connection for the next request; one closed
    before it (`[DONE]` seen, then the stream closed) drops it, and every turn would open a new
    connection: a TCP handshake on loopback, a TLS handshake to a cloud LLM (tens of milliseconds).
    A server that keeps the stream open after `[DONE]` costs the connection, not the caller's time.
    """
    try:
        async with asyncio.timeout(_AFTER_DONE):
            async for _ in lines:
                pass
    except _READ_ERRORS:
        pass
    finally:
        await lines.aclose()


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncGenerator[bytes]:
    """The `data` of each server-sent event, from the raw byte stream.

    Events may be split across network chunks or share one; lines end in LF or CRLF; comment lines
    (`: keep-alive`) and `event:`/`id:`/`retry:` fields are skipped; several `data:` lines in one
    event are joined with newlines, as the SSE specification says.
    """
    pending = b""
    data: list[bytes] = []
    async for chunk in response.content.iter_any():
        buffer = pending + chunk if pending else chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield data[0] if len(data) == 1 else b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
        pending = buffer[start:]
    if pending.startswith(b"data:"):
        value = pending[5:].rstrip(b"\r")
        data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield b"\n".join(data)


def map_messages(
    messages: Sequence[ModelMessage], instructions: Sequence[str] = (), cache: MessageCache | None = None
) -> list[dict[str, Any]]:
    """pydantic-ai messages as Chat Completions messages, plain dicts, in one pass.

    Instructions go in as system messages after the history's leading system prompts, as
    `OpenAIChatModel` puts them. Retry prompts arrive already translated by `Model.prepare_messages`
    (which the agent runs before every request): a tool's retry is a `ToolReturnPart`, other feedback
    a user or system prompt. With a `cache`, a message mapped for an earlier request is not mapped again.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        out.extend(cache.get(message) if cache is not None else _map_message(message))
    if instructions:
        leading = 0
        while leading < len(out) and out[leading]["role"] == "system":
            leading += 1
        out[leading:leading] = [{"role": "system", "content": text} for text in instructions]
    return out


class MessageCache:
    """The mapped form of each message a model has sent, so a conversation's history is mapped once.

    Every request of a conversation carries its whole history again; mapping 160 messages (40 exchanges
    with a tool call each) took 0.28 ms, a lookup per message a tenth of that. pydantic-ai messages are
    unhashable dataclasses, so entries are keyed by `id()`, hold a weak reference that drops the entry
    with the message, and are checked against the identity of the message's parts, so a message whose
    parts were replaced is mapped again. (`Model.prepare_messages` hands back the history's own message
    objects when it has nothing to change, so the lookups hit.) The mapped dicts are shared by every
    body built from them and must not be changed.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[ModelMessage], tuple[int, ...], list[dict[str, Any]]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, message: ModelMessage) -> list[dict[str, Any]]:
        """The mapped form of `message`, from the cache when it holds it."""
        key = id(message)
        parts = tuple(map(id, message.parts))
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is message and entry[1] == parts:
            return entry[2]
        mapped = _map_message(message)
        entries = self._entries
        self._entries[key] = (weakref.ref(message, lambda _, key=key: entries.pop(key, None)), parts, mapped)
        return mapped


def _map_message(message: ModelMessage) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if isinstance(message, ModelRequest):
        for part in message.parts:
            if isinstance(part, UserPromptPart):
                out.append({"role": "user", "content": _user_content(part.content)})
            elif isinstance(part, SystemPromptPart):
                out.append({"role": "system", "content": part.content})
            elif isinstance(part, ToolReturnPart):
                out.append({"role": "tool", "tool_call_id": part.tool_call_id, "content": part.model_response_str()})
        return out
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            text.append(part.content)
        elif isinstance(part, ToolCallPart):
            calls.append(
                {
                    "id": part.tool_call_id,
                    "type": "function",
                    "function": {"name": part.tool_name, "arguments": part.args_as_json_str()},
                }
            )
    if text or calls:
        assistant: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None}
        if calls:
            assistant["tool_calls"] = calls
        out.append(assistant)
    return out


def _user_content(content: str | Sequence[Any]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for item in content:
        if isinstance(item, str):
            parts.append({"type": "text", "text": item})
        elif isinstance(item, ImageUrl):
            parts.append({"type": "image_url", "image_url": {"url": item.url}})
        elif isinstance(item, BinaryContent) and item.is_image:
            data = base64.b64encode(item.data).decode()
            parts.append({"type": "image_url", "image_url": {"url": f"data:{item.media_type};base64,{data}"}})
        else:
            raise UserError(
                f"the lean Chat Completions client sends text and images only, not {type(item).__name__}; "
                "set OPENAI_CLIENT=sdk for the OpenAI SDK's model"
            )
    return parts


def _tools(settings: ModelSettings, params: ModelRequestParameters) -> tuple[list[dict[str, Any]], object]:
    """The tool definitions and `tool_choice`, resolved the way pydantic-ai's own Chat Completions model does."""
    defs = params.declared_tool_defs
    if not defs:
        return [], None
    resolved = resolve_tool_choice(settings, params)
    choice: object
    if isinstance(resolved, tuple):
        mode, names = resolved
        defs = {name: tool for name, tool in defs.items() if name in names}
        if mode == "required" and len(names) == 1:
            choice = {"type": "function", "function": {"name": next(iter(names))}}
        else:
            choice = mode
    else:
        choice = resolved
    return [_tool(tool) for tool in defs.values()], choice


def _tool(tool: ToolDefinition) -> dict[str, Any]:
    function: dict[str, Any] = {
        "name": tool.name,
        "description": tool.description or "",
        "parameters": tool.parameters_json_schema,
    }
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _usage(data: dict[str, Any]) -> RequestUsage:
    details = {key: value for key, value in data.items() if isinstance(value, int) and not key.endswith("_tokens")}
    cached = (data.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (data.get("completion_tokens_details") or {}).get("reasoning_tokens")
    if reasoning:
        details["reasoning_tokens"] = reasoning
    return RequestUsage(
        input_tokens=data.get("prompt_tokens") or 0,
        output_tokens=data.get("completion_tokens") or 0,
        cache_read_tokens=cached,
        details=details,
    )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else str(value) if isinstance(value, int) else None


def _timeout(setting: object) -> aiohttp.ClientTimeout | None:
    """`ModelSettings.timeout` for aiohttp: seconds for each of connecting and every read, or an `httpx.Timeout`."""
    if isinstance(setting, httpx.Timeout):
        return aiohttp.ClientTimeout(total=None, sock_connect=setting.connect, sock_read=setting.read)
    if isinstance(setting, int | float) and not isinstance(setting, bool):
        return _seconds_timeout(float(setting))
    return None


@functools.lru_cache(maxsize=16)
def _seconds_timeout(seconds: float) -> aiohttp.ClientTimeout:
    # The same setting on every request: one object, not one per request.
    return aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)


@dataclass(frozen=True, slots=True)
class _Route:
    """How requests reach the server: through a proxy or not, with `.netrc` credentials or not."""

    proxy: URL | None = None
    proxy_auth: aiohttp.BasicAuth | None = None
    auth: aiohttp.BasicAuth | None = None


def _route_from_env(url: str, *, with_key: bool) -> _Route:
    """The proxy and `.netrc` credentials for `url`, found as aiohttp's `trust_env` finds them.

    The proxy is the one the environment names for the URL's scheme unless `NO_PROXY` excludes its host;
    credentials only when no API key is sent (aiohttp refuses both at once).
    """
    target = URL(url)
    proxy: URL | None = None
    proxy_auth: aiohttp.BasicAuth | None = None
    with contextlib.suppress(LookupError):
        proxy, proxy_auth = aiohttp_helpers.get_env_proxy_for_url(target)
    auth: aiohttp.BasicAuth | None = None
    if not with_key and target.host is not None:
        with contextlib.suppress(LookupError):
            auth = aiohttp_helpers.basicauth_from_netrc(aiohttp_helpers.netrc_from_env(), target.host)
    return _Route(proxy, proxy_auth, auth)


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
