"""Scripted conversations against any Layercode agent backend, for regression tests and CI.

Why here and not in the tests: a scenario speaks to a backend exactly as Layercode does (signed webhooks through
`client.WebhookClient`, SSE read as it arrives, a barge-in aborts the request and the next `message` carries
`interruption_context`), so the same files check this server locally, a deployment, or someone else's backend.
It imports no server code.

A scenario file (YAML) holds one scenario, or a list of them under `scenarios:`::

    name: greeting
    welcome: true                    # send session.start first (or `welcome: {expect: {...}}`)
    metadata: {plan: pro}            # sent as `custom_metadata` on every webhook
    steps:
      - say: "Hello, who are you?"
        expect: {contains: [hello], max_first_token_ms: 3000}
      - say: "Tell me a long story."
        interrupt_after_words: 3     # abort after 3 spoken words; the next `say` reports what was heard
      - data: {button: ok}           # a `data` webhook; `expect` applies to the JSON answer's content
      - end: true                    # session.end with the transcript so far

Each step may wait `pause_ms` before it is sent. Expectations (all optional): `contains` / `not_contains`
(case-insensitive, a string or a list), `regex` / `not_regex` (Python `re.search`, a string or a list),
`max_first_token_ms` (to the first `response.tts`), `max_total_ms`, `status` (default 200) and
`ends_with_response_end` (default true: a streamed turn ends with exactly one `response.end`).
"""

from __future__ import annotations

import asyncio
import difflib
import json
import re
import statistics
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import httpx
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from .client import Transcript, WebhookClient, interruption_context

__all__ = [
    "DataStep",
    "EndStep",
    "Expect",
    "SayStep",
    "Scenario",
    "ScenarioError",
    "ScenarioResult",
    "StepResult",
    "Welcome",
    "check_reachable",
    "load_scenarios",
    "run_scenario",
    "run_scenarios",
]


class ScenarioError(Exception):
    """A scenario file that cannot be run (unreadable, not YAML, not a valid scenario); the message says where."""


# --- The scenario file --------------------------------------------------------------------------------


class Expect(BaseModel):
    """What a step's answer must satisfy."""

    model_config = ConfigDict(extra="forbid")

    contains: list[str] = Field(default_factory=list[str])
    """Each must appear in the reply (case-insensitive)."""
    not_contains: list[str] = Field(default_factory=list[str])
    """None may appear in the reply (case-insensitive)."""
    regex: list[str] = Field(default_factory=list[str])
    """Each must be found in the reply (`re.search`)."""
    not_regex: list[str] = Field(default_factory=list[str])
    """None may be found in the reply (`re.search`)."""
    max_first_token_ms: float | None = Field(default=None, gt=0)
    """Longest wait from sending the webhook to the first `response.tts`."""
    max_total_ms: float | None = Field(default=None, gt=0)
    """Longest wait from sending the webhook to the end of the answer."""
    status: int = Field(default=200, ge=100, le=599)
    """The HTTP status expected."""
    ends_with_response_end: bool = True
    """A streamed turn must end with exactly one `response.end`."""

    @field_validator("contains", "not_contains", "regex", "not_regex", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("regex", "not_regex")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return patterns


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expect: Expect = Field(default_factory=Expect)
    pause_ms: float = Field(default=0, ge=0)
    """Wait this long before sending the step."""


class Welcome(_Step):
    """`session.start` before the first step, with its own expectations."""


class SayStep(_Step):
    """A `message` webhook: the caller says something, the reply streams back."""

    say: str
    interrupt_after_words: int | None = Field(default=None, ge=1)
    """Barge in: abort the request once this many words were spoken; the next `say` reports what was heard."""

    @model_validator(mode="after")
    def _interrupted_reply_has_no_end(self) -> SayStep:
        if self.interrupt_after_words is not None:
            if "ends_with_response_end" in self.expect.model_fields_set and self.expect.ends_with_response_end:
                raise ValueError("an interrupted reply never reaches response.end: drop ends_with_response_end")
            if self.expect.max_total_ms is not None:
                raise ValueError("max_total_ms does not apply to an interrupted reply (use max_first_token_ms)")
        return self


class _PlainStep(_Step):
    """A step answered with plain JSON, not a stream: no first token, no `response.end`."""

    @model_validator(mode="after")
    def _no_stream_expectations(self) -> _PlainStep:
        for key in ("max_first_token_ms", "ends_with_response_end"):
            if key in self.expect.model_fields_set:
                raise ValueError(f"expect.{key} applies to streamed turns (say, welcome) only")
        return self


class DataStep(_PlainStep):
    """A `data` webhook (client data); expectations apply to the `content` of the JSON answer."""

    data: Any


class EndStep(_PlainStep):
    """`session.end` with the transcript so far."""

    end: Literal[True]


_STEP_KINDS = ("say", "data", "end")


def _step_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [kind for kind in _STEP_KINDS if kind in value]
        return kinds[0] if len(kinds) == 1 else None
    for kind, model in zip(_STEP_KINDS, (SayStep, DataStep, EndStep), strict=True):
        if isinstance(value, model):
            return kind
    return None


Step = Annotated[
    Annotated[SayStep, Tag("say")] | Annotated[DataStep, Tag("data")] | Annotated[EndStep, Tag("end")],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message="a step needs exactly one of the keys `say`, `data` or `end`",
    ),
]


class Scenario(BaseModel):
    """One scripted conversation."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    conversation_id: str | None = Field(default=None, min_length=1)
    """Layercode's `conversation_id`; a fresh one per run when unset."""
    metadata: dict[str, Any] | None = None
    """Sent as `custom_metadata` on every webhook."""
    welcome: Welcome | None = None
    """`true` (or a mapping with `expect`) sends `session.start` first."""
    steps: list[Step] = Field(default_factory=list[Step])

    _source: str = PrivateAttr(default="")

    @field_validator("welcome", mode="before")
    @classmethod
    def _welcome_flag(cls, value: object) -> object:
        if value is True:
            return {}
        return None if value is False else value

    @model_validator(mode="after")
    def _has_something_to_do(self) -> Scenario:
        if not self.steps and self.welcome is None:
            raise ValueError("nothing to do: add `steps` (or `welcome: true`)")
        return self

    @property
    def source(self) -> str:
        """The file the scenario came from."""
        return self._source


_KNOWN_KEYS = sorted(
    {*Scenario.model_fields, *SayStep.model_fields, *DataStep.model_fields, *EndStep.model_fields, *Expect.model_fields}
)


def load_scenarios(path: Path) -> list[Scenario]:
    """Read and validate one scenario file.

    Args:
        path: A YAML file with one scenario, or a list of them under `scenarios:`.

    Returns:
        The scenarios in file order; a scenario without `name` is named after the file.

    Raises:
        ScenarioError: One line per problem, each naming the file, the scenario, the step and what is wrong.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read the file: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{where}: not valid YAML: {problem}") from None
    shape = "a scenario (a mapping with `name` and `steps`) or `scenarios:` with a list of them"
    if isinstance(document, dict) and "scenarios" in document:
        others = sorted(str(key) for key in cast(dict[Any, Any], document) if key != "scenarios")
        if others:
            raise ScenarioError(f"{path}: beside `scenarios:` the file may hold nothing else (found {others})")
        entries: Any = document["scenarios"]
        if not isinstance(entries, list) or not entries:
            raise ScenarioError(f"{path}: `scenarios:` must be a non-empty list of scenarios")
        many = True
    elif isinstance(document, dict):
        entries, many = [document], False
    else:
        found = "an empty file" if document is None else f"a {type(document).__name__}"
        raise ScenarioError(f"{path}: expected {shape}, found {found}")
    scenarios: list[Scenario] = []
    problems: list[str] = []
    for index, entry in enumerate(cast(list[Any], entries)):
        label = f"#{index + 1}" if many else path.stem
        if not isinstance(entry, dict):
            problems.append(f"{path}: scenario {label}: expected a mapping, found a {type(entry).__name__}")
            continue
        entry = cast(dict[str, Any], entry)
        if isinstance(entry.get("name"), str) and entry["name"]:
            label = entry["name"]
        try:
            scenario = Scenario.model_validate({"name": label, **entry})
        except ValidationError as exc:
            problems.extend(_describe(path, label, error) for error in exc.errors())
            continue
        scenario._source = str(path)
        scenarios.append(scenario)
    if problems:
        raise ScenarioError("\n".join(problems))
    return scenarios


def _describe(path: Path, label: str, error: ErrorDetails) -> str:
    """One validation error as `FILE: scenario NAME, step N (KIND): FIELD: what is wrong`."""
    where = [f"scenario {label!r}"]
    loc = list(error["loc"])
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        kind = loc[2] if len(loc) >= 3 and loc[2] in _STEP_KINDS else None
        where.append(f"step {loc[1] + 1}" + (f" ({kind})" if kind else ""))
        loc = loc[3:] if kind else loc[2:]
    elif loc[:1] == ["welcome"]:
        where.append("welcome")
        loc = loc[1:]
    message = error["msg"].removeprefix("Value error, ")
    key = str(loc[-1]) if loc else ""
    if error["type"] == "extra_forbidden":
        message = f"unknown key {key!r}"
        if close := difflib.get_close_matches(key, _KNOWN_KEYS, n=1):
            message += f" (did you mean {close[0]!r}?)"
        loc = loc[:-1]
    elif error["type"] == "missing":
        message = f"missing required key {key!r}"
        loc = loc[:-1]
    elif error["type"] == "step_kind" and isinstance(error["input"], dict):
        keys = sorted(str(key) for key in cast(dict[Any, Any], error["input"]))
        message += f" (it has {', '.join(keys) or 'no keys'})"
    elif error["type"] == "step_kind":
        message += f" (found {error['input']!r})"
    field_path = ".".join(str(part) for part in loc)
    return f"{path}: {', '.join(where)}: " + (f"{field_path}: " if field_path else "") + message


# --- Results ------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one step sent and got back, and which expectations it missed."""

    number: int
    """1-based step number; 0 for the welcome."""
    kind: Literal["welcome", "say", "data", "end"]
    label: str
    status: int | None = None
    text: str = ""
    """What was spoken (or heard, when interrupted), the JSON content of a `data` answer, or the body."""
    event_types: list[str] = field(default_factory=list[str])
    first_token_ms: float | None = None
    total_ms: float | None = None
    interrupted: bool = False
    failures: list[str] = field(default_factory=list[str])

    @property
    def passed(self) -> bool:
        """Whether every expectation held."""
        return not self.failures

    @property
    def title(self) -> str:
        """`step N (label)`, or `welcome`."""
        return "welcome" if self.kind == "welcome" else f"step {self.number} ({self.label})"


@dataclass
class ScenarioResult:
    """One scenario's run."""

    name: str
    source: str
    conversation_id: str
    steps: list[StepResult] = field(default_factory=list[StepResult])
    planned: int = 0
    """Steps in the scenario, the welcome included; fewer ran when a request failed."""
    duration_ms: float = 0.0

    @property
    def passed(self) -> bool:
        """Whether every step ran and passed."""
        return len(self.steps) == self.planned and all(step.passed for step in self.steps)

    @property
    def failed_steps(self) -> list[StepResult]:
        """The steps that missed an expectation."""
        return [step for step in self.steps if not step.passed]

    @property
    def first_token_ms(self) -> list[float]:
        """Time to the first `response.tts` of every `say` step that got one."""
        return [step.first_token_ms for step in self.steps if step.kind == "say" and step.first_token_ms is not None]

    @property
    def first_token_p50(self) -> float | None:
        """Median time to first token over the `say` steps."""
        values = self.first_token_ms
        return statistics.median(values) if values else None

    @property
    def first_token_max(self) -> float | None:
        """Slowest time to first token over the `say` steps."""
        values = self.first_token_ms
        return max(values) if values else None

    @property
    def failures(self) -> list[str]:
        """Every failure as `step N (label): reason`."""
        lines = [f"{step.title}: {reason}" for step in self.steps for reason in step.failures]
        if len(self.steps) < self.planned:
            lines.append(f"{self.planned - len(self.steps)} step(s) not run")
        return lines


# --- Running ------------------------------------------------------------------------------------------


async def check_reachable(url: str, *, request_timeout: float = 5.0) -> str | None:
    """Whether anything answers HTTP at `url` (any status will do).

    Returns:
        `None` when it answers, else why not, in words.
    """
    try:
        async with httpx.AsyncClient(timeout=request_timeout) as http:
            await http.head(url)
    except httpx.HTTPError as exc:
        return _http_error(exc)
    return None


async def run_scenarios(
    scenarios: Sequence[Scenario],
    *,
    url: str,
    secret: str | SecretStr,
    concurrency: int = 4,
    request_timeout: float = 60.0,
    on_result: Callable[[ScenarioResult], None] | None = None,
) -> list[ScenarioResult]:
    """Run scenarios, each as its own conversation, at most `concurrency` at a time.

    Args:
        scenarios: What to run.
        url: The backend's webhook URL.
        secret: The webhook secret to sign with.
        concurrency: Scenarios in flight at once.
        request_timeout: Seconds any one request may wait for the network (connect, or between two reads).
        on_result: Called with each result as its scenario finishes.

    Returns:
        The results, in the order of `scenarios`.
    """
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=max(10, concurrency * 2), max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as http:

        async def one(scenario: Scenario) -> ScenarioResult:
            async with gate:
                result = await run_scenario(scenario, url=url, secret=secret, http=http)
            if on_result is not None:
                on_result(result)
            return result

        return list(await asyncio.gather(*(one(scenario) for scenario in scenarios)))


async def run_scenario(
    scenario: Scenario, *, url: str, secret: str | SecretStr, http: httpx.AsyncClient
) -> ScenarioResult:
    """Play one scenario as one conversation; a failed request ends it (the remaining steps do not run)."""
    client = WebhookClient(url, secret, conversation_id=scenario.conversation_id, http=http)
    plan: list[tuple[int, Welcome | SayStep | DataStep | EndStep]] = []
    if scenario.welcome is not None:
        plan.append((0, scenario.welcome))
    plan.extend(enumerate(scenario.steps, start=1))
    result = ScenarioResult(scenario.name, scenario.source, client.conversation_id, planned=len(plan))
    extra: dict[str, Any] = {} if scenario.metadata is None else {"custom_metadata": scenario.metadata}
    transcript = Transcript()
    heard: dict[str, Any] | None = None  # the interruption_context the next `say` carries
    started, started_at = time.perf_counter(), datetime.now(UTC)
    for number, step in plan:
        if step.pause_ms:
            await asyncio.sleep(step.pause_ms / 1000)
        outcome = _outcome(number, step)
        try:
            match step:
                case Welcome():
                    await _stream(client, client.body("session.start", **extra), outcome, step.expect)
                    transcript.add("assistant", outcome.text)
                case SayStep():
                    fields = dict(extra)
                    if heard is not None:
                        fields["interruption_context"], heard = heard, None
                    body = client.body("message", text=step.say, **fields)
                    transcript.add("user", step.say)
                    await _stream(client, body, outcome, step.expect, interrupt_after=step.interrupt_after_words)
                    transcript.add("assistant", outcome.text)
                    if outcome.interrupted:
                        heard = interruption_context(body["turn_id"], outcome.text)
                case DataStep():
                    await _post(client, client.body("data", data=step.data, **extra), outcome, step.expect)
                case EndStep():
                    ended_at = datetime.now(UTC)
                    body = client.body(
                        "session.end",
                        started_at=_iso(started_at),
                        ended_at=_iso(ended_at),
                        duration=int((ended_at - started_at).total_seconds() * 1000),
                        transcript=list(transcript.entries),
                        **extra,
                    )
                    await _post(client, body, outcome, step.expect)
        except httpx.HTTPError as exc:
            outcome.failures.append(f"request failed: {_http_error(exc)}")
            result.steps.append(outcome)
            break
        result.steps.append(outcome)
    result.duration_ms = (time.perf_counter() - started) * 1000
    return result


def _outcome(number: int, step: Welcome | SayStep | DataStep | EndStep) -> StepResult:
    """An empty result for `step`, labelled for the report."""
    match step:
        case Welcome():
            return StepResult(number, "welcome", "session.start")
        case SayStep():
            return StepResult(number, "say", f"say {_short(step.say, 40)!r}")
        case DataStep():
            return StepResult(number, "data", f"data {_short(_json(step.data), 40)}")
        case EndStep():
            return StepResult(number, "end", "session.end")


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _stream(
    client: WebhookClient,
    body: dict[str, Any],
    outcome: StepResult,
    expect: Expect,
    *,
    interrupt_after: int | None = None,
) -> None:
    """Send a streamed webhook, read the SSE answer (aborting it on barge-in), then check it."""
    started = time.perf_counter()
    spoken: list[str] = []
    try:
        # `stream()` is an async generator: closing it (on barge-in) aborts the HTTP request at once.
        events = cast(AsyncGenerator[tuple[float, dict[str, Any]]], client.stream(body))
        async with aclosing(events) as stream:
            async for at, event in stream:
                outcome.status = 200  # `stream()` raises before the first event otherwise
                kind = str(event.get("type"))
                outcome.event_types.append(kind)
                if kind != "response.tts":
                    continue
                if outcome.first_token_ms is None:
                    outcome.first_token_ms = at
                spoken.append(str(event.get("content", "")))
                if interrupt_after is not None and (words := _words_heard("".join(spoken), interrupt_after)):
                    outcome.interrupted, outcome.text = True, words
                    break
    except httpx.HTTPStatusError as exc:
        outcome.status = exc.response.status_code
        outcome.text = exc.response.text
    else:
        outcome.status = 200
        if not outcome.interrupted:
            outcome.text = "".join(spoken).strip()
    outcome.total_ms = (time.perf_counter() - started) * 1000
    outcome.failures.extend(_check(expect, outcome, streamed=True))
    if interrupt_after is not None and not outcome.interrupted and outcome.status == expect.status == 200:
        count = len(outcome.text.split())
        outcome.failures.append(
            f"the reply ended after {count} word(s), before the caller could interrupt after {interrupt_after}"
        )


async def _post(client: WebhookClient, body: dict[str, Any], outcome: StepResult, expect: Expect) -> None:
    """Send a plain-JSON webhook (`data`, `session.end`) and check the answer."""
    started = time.perf_counter()
    response = await client.post(body)
    outcome.total_ms = (time.perf_counter() - started) * 1000
    outcome.status = response.status_code
    outcome.text = response.text
    if outcome.kind == "data" and response.status_code == 200:
        try:
            answer = response.json()
        except ValueError:
            outcome.failures.append(f"the answer is not JSON: {_short(response.text, 120)!r}")
            return
        # Layercode expects `{"type": "response.data", "content": ...}`; other backends may answer any JSON.
        if isinstance(answer, dict) and answer.get("type") == "response.data" and "content" in answer:
            answer = cast(dict[str, Any], answer)["content"]
        outcome.text = _json(answer)
    outcome.failures.extend(_check(expect, outcome, streamed=False))


def _words_heard(text: str, words: int) -> str | None:
    """The first `words` words once that many were spoken in full (a next word, or a space, followed), else None."""
    split = text.split()
    if len(split) > words or (len(split) == words and text[-1:].isspace()):
        return " ".join(split[:words])
    return None


def _check(expect: Expect, outcome: StepResult, *, streamed: bool) -> list[str]:
    """The expectations `outcome` misses, each as a short reason."""
    if outcome.status != expect.status:
        body = f": {_short(outcome.text, 200)!r}" if outcome.text else ""
        return [f"HTTP status {outcome.status}, expected {expect.status}{body}"]
    failures: list[str] = []
    what = "the JSON content" if outcome.kind == "data" and outcome.status == 200 else "the reply"
    text, folded = outcome.text, outcome.text.casefold()
    failures.extend(f"{what} does not contain {n!r}" for n in expect.contains if n.casefold() not in folded)
    failures.extend(f"{what} contains {n!r}" for n in expect.not_contains if n.casefold() in folded)
    failures.extend(f"{what} does not match /{p}/" for p in expect.regex if re.search(p, text) is None)
    for pattern in expect.not_regex:
        if (found := re.search(pattern, text)) is not None:
            failures.append(f"{what} matches /{pattern}/ at {found.group(0)!r}")
    if streamed and outcome.status == 200 and expect.max_first_token_ms is not None:
        if outcome.first_token_ms is None:
            failures.append(f"no response.tts arrived (max_first_token_ms {expect.max_first_token_ms:g})")
        elif outcome.first_token_ms > expect.max_first_token_ms:
            failures.append(
                f"first token after {outcome.first_token_ms:.0f} ms, over max_first_token_ms "
                f"{expect.max_first_token_ms:g}"
            )
    if expect.max_total_ms is not None and outcome.total_ms is not None and outcome.total_ms > expect.max_total_ms:
        failures.append(f"took {outcome.total_ms:.0f} ms, over max_total_ms {expect.max_total_ms:g}")
    if streamed and outcome.status == 200 and not outcome.interrupted and expect.ends_with_response_end:
        ends = outcome.event_types.count("response.end")
        if ends == 0:
            failures.append(f"the stream ended without response.end (events: {_kinds(outcome.event_types)})")
        elif ends > 1:
            failures.append(f"{ends} response.end events, expected exactly one")
        elif outcome.event_types[-1] != "response.end":
            failures.append(f"events after response.end: {_kinds(outcome.event_types)}")
    return failures


def _kinds(types: list[str]) -> str:
    """`response.tts x12, response.data` from a list of event types, runs collapsed."""
    if not types:
        return "none"
    runs: list[list[Any]] = []
    for kind in types:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return ", ".join(f"{kind} x{count}" if count > 1 else str(kind) for kind, count in runs)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _http_error(exc: httpx.HTTPError) -> str:
    reason = str(exc) or type(exc).__name__
    try:
        where = f" ({exc.request.method} {exc.request.url})"
    except RuntimeError:  # no request attached
        where = ""
    return f"{type(exc).__name__}: {reason}{where}"
