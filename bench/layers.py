"""`python -m bench.layers`: where a turn's CPU goes, layer by layer, in one process against the bench's fake LLM.

The main bench measures the whole server. This one takes the same reply (the fake LLM's tokens, `--token-ms`
apart) through ever more of the stack, each layer on its own, and reports the CPU this process spent per reply:

| layer | what runs |
|---|---|
| `aiohttp` | the chat-completions request, its SSE body read chunk by chunk, nothing parsed: the floor's client |
| `lean model` | the project's `ChatCompletionsModel` streaming response (`pydantic_ai.direct.model_request_stream`) |
| `pydantic-ai agent` | the project's agent run on the lean model (`agent.iter`, node streams), as a turn runs it |
| `turn (memory)` | the whole turn (`TurnRunner`: turn record, cleaning, queue) on the memory store |
| `turn (sqlite)` | the same on SQLite (its thread's CPU included) |
| `httpx` | the same request read line by line with httpx, nothing parsed |
| `openai SDK` | the OpenAI SDK's streaming call, every chunk parsed into its pydantic models |
| `pydantic-ai model (SDK)` | pydantic-ai's `OpenAIChatModel` streaming response, on the SDK (`OPENAI_CLIENT=sdk`) |
| `pydantic-ai agent (SDK)` | the agent run on that model |

Each figure includes the layer it is built on (in brackets: what the layer adds to that one): the lean model
on aiohttp, the agent on the lean model, each turn on the agent; and the SDK's chain on httpx. The difference
between the agent and the lean model is what pydantic-ai's run costs a reply, whatever the model.

The first table streams the full reply (per-token cost); the second asks for a one-token reply
with 0, 10 and 40 earlier exchanges in the conversation (the per-request cost, and how it grows with history:
every earlier message is converted and encoded again on every request).

    python -m bench.layers [--tokens 60] [--token-ms 10] [--replies 10] [--runs 3] [--histories 0,10,40]

This process is pinned to the first core and the fake LLM to the other one where there are two (`--no-pin` not
to). Figures are medians over `--runs`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
from pydantic_ai.direct import model_request_stream
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, UserPromptPart
from pydantic_ai.models import Model
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from rich.console import Console
from rich.table import Table

from layercode_agent.agent import CallContext, ChatCompletionsModel, build_agent
from layercode_agent.history import COMPLETED, turn_meta
from layercode_agent.protocol import MessageEvent
from layercode_agent.stores import AgentStore, open_store
from layercode_agent.turns import TurnRunner

from ._procs import FakeLLMProcess, available_cores, pin_self, run_async
from ._report import machine_info, machine_line
from .fake_llm import reply_text

__all__ = ["LAYERS", "main", "measure"]

LAYERS: dict[str, str | None] = {
    "aiohttp": None,
    "lean model": "aiohttp",
    "pydantic-ai agent": "lean model",
    "turn (memory)": "pydantic-ai agent",
    "turn (sqlite)": "pydantic-ai agent",
    "httpx": None,
    "openai SDK": "httpx",
    "pydantic-ai model (SDK)": "openai SDK",
    "pydantic-ai agent (SDK)": "pydantic-ai model (SDK)",
}
"""Each layer, and the one it is built on (its figure includes that one's)."""

Reply = Callable[[int], Awaitable[None]]
"""Ask for reply number `n` (its key and history follow from `n`) and read it to the end."""


@dataclass(frozen=True)
class Figure:
    layer: str
    history: int
    """Earlier exchanges (caller message + reply) in the conversation the request carries."""
    cpu_ms: float
    """This process's CPU per reply (user + system, every thread), median over the runs."""
    wall_ms: float


def _key(n: int) -> str:
    return f"k{n:012x}"


def _exchanges(count: int, tokens: int) -> list[ModelMessage]:
    """`count` earlier exchanges, marked as turns the way the turn runner stores them."""
    messages: list[ModelMessage] = []
    for index in range(count):
        key, turn_id = _key(10**9 + index), f"past_{index}"
        messages.append(ModelRequest(parts=[UserPromptPart(f"Say {key}.")], metadata=turn_meta(turn_id, "user")))
        messages.append(
            ModelResponse(
                parts=[TextPart(reply_text(key, tokens))], metadata=turn_meta(turn_id, "assistant", COMPLETED)
            )
        )
    return messages


def _openai_messages(history: list[ModelMessage], text: str) -> list[ChatCompletionMessageParam]:
    wire: list[ChatCompletionMessageParam] = [{"role": "system", "content": "You are a helpful voice agent."}]
    for message in history:
        role = "user" if isinstance(message, ModelRequest) else "assistant"
        part = message.parts[0]
        content = str(getattr(part, "content", ""))
        wire.append(
            {"role": "user", "content": content} if role == "user" else {"role": "assistant", "content": content}
        )
    return [*wire, {"role": "user", "content": text}]


class _Layers:
    """Each layer's way of asking for one reply, against one fake LLM, with `history` earlier exchanges."""

    def __init__(self, base_url: str, history: int, tokens: int, data_dir: Path) -> None:
        self.base_url = base_url
        self.history = history
        self.past = _exchanges(history, tokens)
        self.http = httpx.AsyncClient(timeout=60)
        self.session: aiohttp.ClientSession | None = None
        self.sdk = AsyncOpenAI(base_url=base_url, api_key="bench")
        self.sdk_model = OpenAIChatModel("bench", provider=OpenAIProvider(base_url=base_url, api_key="bench"))
        self.sdk_agent = build_agent(model=self.sdk_model)
        self.model = ChatCompletionsModel("bench", base_url=base_url, api_key="bench")
        self.agent = build_agent(model=self.model)
        self.data_dir = data_dir
        self.stores: list[AgentStore] = []

    async def aclose(self) -> None:
        await self.http.aclose()
        if self.session is not None:
            await self.session.close()
        await self.model.aclose()
        await self.sdk.close()
        for store in self.stores:
            await store.aclose()

    def reply(self, layer: str) -> tuple[Reply, Callable[[Sequence[int]], Awaitable[None]]]:
        """How `layer` asks for reply `n`, and what to do (untimed) before replies `ns` are asked for."""
        plain = {
            "aiohttp": self._aiohttp,
            "lean model": lambda n: self._model(self.model, n),
            "pydantic-ai agent": lambda n: self._agent(self.agent, n),
            "httpx": self._httpx,
            "openai SDK": self._openai,
            "pydantic-ai model (SDK)": lambda n: self._model(self.sdk_model, n),
            "pydantic-ai agent (SDK)": lambda n: self._agent(self.sdk_agent, n),
        }
        if layer in plain:
            return plain[layer], _nothing
        return self._turns("memory://" if layer == "turn (memory)" else self._sqlite_url())

    def _sqlite_url(self) -> str:
        return f"sqlite:///{self.data_dir / f'layers-{self.history}-{time.monotonic_ns()}.db'}"

    def _text(self, n: int) -> str:
        return f"Say {_key(n)}."

    async def _aiohttp(self, n: int) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        body = {"model": "bench", "stream": True, "messages": _openai_messages(self.past, self._text(n))}
        async with self.session.post(f"{self.base_url}/chat/completions", json=body) as response:
            async for _ in response.content.iter_any():
                pass

    async def _httpx(self, n: int) -> None:
        body = {"model": "bench", "stream": True, "messages": _openai_messages(self.past, self._text(n))}
        async with self.http.stream("POST", f"{self.base_url}/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    break

    async def _openai(self, n: int) -> None:
        stream = await self.sdk.chat.completions.create(
            model="bench",
            messages=_openai_messages(self.past, self._text(n)),
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _ in stream:
            pass

    def _conversation(self, n: int) -> list[ModelMessage]:
        return [*self.past, ModelRequest(parts=[UserPromptPart(self._text(n))])]

    async def _model(self, model: Model, n: int) -> None:
        async with model_request_stream(model, self._conversation(n)) as stream:
            async for _ in stream:
                pass

    async def _agent(self, agent: Agent[CallContext, str], n: int) -> None:
        conversation = Conversation(messages=self._conversation(n), conversation_id="bench")
        async with agent.iter(conversation=conversation, deps=CallContext(conversation_id="bench")) as run:
            async for node in run:
                if agent.is_model_request_node(node) or agent.is_call_tools_node(node):
                    async with node.stream(run.ctx) as stream:
                        async for _ in stream:
                            pass

    def _turns(self, store_url: str) -> tuple[Reply, Callable[[Sequence[int]], Awaitable[None]]]:
        store = open_store(store_url)
        self.stores.append(store)
        runner = TurnRunner(agent=self.agent, store=store, model=self.model)
        prefix = f"bench_{time.monotonic_ns()}"

        async def prepare(numbers: Sequence[int]) -> None:
            # Each reply in a conversation of its own that already holds `history` exchanges, as the other layers send.
            if self.past:
                for n in numbers:
                    await store.save(Conversation(messages=list(self.past), conversation_id=f"{prefix}_{n}"))

        async def reply(n: int) -> None:
            event = MessageEvent(conversation_id=f"{prefix}_{n}", turn_id=f"turn_{n}", text=self._text(n))
            async for _ in runner.stream_message(event):
                pass

        return reply, prepare


async def _nothing(numbers: Sequence[int]) -> None:
    return None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure_layer(layers: _Layers, layer: str, replies: int, runs: int, warmup: int) -> Figure:
    reply, prepare = layers.reply(layer)
    cpu: list[float] = []
    wall: list[float] = []
    number = 0
    for run in range(runs + 1):
        count = warmup if run == 0 else replies
        numbers = list(range(number, number + count))
        number += count
        await prepare(numbers)
        cpu_before, wall_before = _cpu(), time.perf_counter()
        for n in numbers:
            await reply(n)
        if run:  # Run 0 warms up: connections, imports, caches.
            cpu.append((_cpu() - cpu_before) * 1000 / count)
            wall.append((time.perf_counter() - wall_before) * 1000 / count)
    return Figure(layer, layers.history, statistics.median(cpu), statistics.median(wall))


async def measure(
    base_url: str, *, tokens: int, histories: Sequence[int], replies: int, runs: int, warmup: int = 3
) -> list[Figure]:
    """Every layer at every history length, against the fake LLM at `base_url`."""
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="layercode-bench-layers-") as directory:
        for history in histories:
            layers = _Layers(base_url, history, tokens, Path(directory))
            try:
                for layer in LAYERS:
                    figures.append(await _measure_layer(layers, layer, replies, runs, warmup))
            finally:
                await layers.aclose()
    return figures


def _table(title: str, figures: list[Figure], histories: Sequence[int]) -> tuple[Table, str]:
    """The figures as a rich table and as markdown: one row per layer, CPU per reply (and what the layer adds)."""
    headers = ["layer"] + [f"history {history}: CPU/reply (+ added)" for history in histories]
    rows: list[list[str]] = []
    for layer in LAYERS:
        cells = [layer]
        for history in histories:
            by_layer = {figure.layer: figure for figure in figures if figure.history == history}
            figure = by_layer[layer]
            base = LAYERS[layer]
            above = by_layer[base] if base is not None else None
            added = f" ({figure.cpu_ms - above.cpu_ms:+.2f})" if above is not None else ""
            cells.append(f"{figure.cpu_ms:.2f}{added}")
        rows.append(cells)
    table = Table(title=title, title_justify="left")
    for position, header in enumerate(headers):
        table.add_column(header, justify="left" if position == 0 else "right")
    for row in rows:
        table.add_row(*row)
    lines = [f"| {' | '.join(headers)} |", "|" + "---|" + "---:|" * len(histories)]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return table, "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.layers", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=60, help="tokens in the streamed reply (default 60)")
    parser.add_argument("--token-ms", type=float, default=10.0, help="time between tokens (default 10)")
    parser.add_argument("--replies", type=int, default=10, help="replies per layer and run (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is shown (default 3)")
    parser.add_argument(
        "--histories", default="0,10,40", help="earlier exchanges for the per-request table (default 0,10,40)"
    )
    parser.add_argument("--stream-history", type=int, default=2, help="earlier exchanges for the streaming table")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--markdown", type=Path, help="write both tables here, as markdown")
    parser.add_argument("--no-pin", action="store_true", help="do not pin this process and the fake LLM")
    args = parser.parse_args(argv)
    try:
        args.histories = [int(part) for part in args.histories.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--histories: expected numbers separated by commas, got {args.histories!r}")
    if args.tokens < 1 or args.replies < 1 or args.runs < 1 or min(args.histories, default=0) < 0:
        parser.error("--tokens, --replies and --runs must be at least 1, and --histories at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print both tables; exit status 0, or 2 on bad options."""
    args = parse_args(argv)
    console = Console(width=160)
    cores = available_cores()
    mine, other = ([cores[0]], cores[1:]) if len(cores) > 1 and not args.no_pin else (None, None)
    pin_self(mine)
    machine = machine_info()
    console.print(f"[bold]Machine[/]: {machine_line(machine)}", highlight=False)
    streaming_title = (
        f"CPU per reply in ms: {args.tokens} tokens {args.token_ms:g} ms apart, {args.stream_history} earlier exchanges"
    )
    request_title = "CPU per request in ms: a one-token reply, by earlier exchanges in the conversation"
    streamer = FakeLLMProcess(ttft_ms=0, tokens=args.tokens, token_ms=args.token_ms, cores=other or None)
    try:
        streaming = run_async(
            measure(
                streamer.base_url,
                tokens=args.tokens,
                histories=[args.stream_history],
                replies=args.replies,
                runs=args.runs,
            )
        )
    finally:
        streamer.stop()
    one_token = FakeLLMProcess(ttft_ms=0, tokens=1, token_ms=0, cores=other or None)
    try:
        requests = run_async(
            measure(one_token.base_url, tokens=1, histories=args.histories, replies=args.replies, runs=args.runs)
        )
    finally:
        one_token.stop()
    first, first_md = _table(streaming_title, streaming, [args.stream_history])
    second, second_md = _table(request_title, requests, args.histories)
    console.print(first)
    console.print(second)
    if args.json is not None:
        document = {
            "machine": machine,
            "settings": {key: value for key, value in vars(args).items() if key not in ("json", "markdown")},
            "streaming": [vars(figure) for figure in streaming],
            "requests": [vars(figure) for figure in requests],
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    if args.markdown is not None:
        args.markdown.write_text(f"{streaming_title}:\n\n{first_md}\n\n{request_title}:\n\n{second_md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
