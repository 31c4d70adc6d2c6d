"""The latency bench (`bench/`, `make bench`) at CI size, and the pure pieces it computes its figures with."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench._chart import PANELS, chart_svg
from bench._figures import LevelResult, RunFigures, Suite, floor_ratios, percentile
from bench._history import defects_of
from bench._procs import FakeLLMProcess, FloorProcess
from bench._tables import goal_misses, markdown_table
from bench.fake_llm import KEY_PATTERN, reply_text, reply_tokens
from bench.floor import verified
from bench.layers import LAYERS
from bench.load import Conversation, TurnSample
from layercode_agent.conversations import ConversationDetail, TurnView
from layercode_agent.protocol import SIGNATURE_HEADER, sign

REPO = Path(__file__).resolve().parents[1]


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(value) for value in range(101)], 99) == pytest.approx(99.0)


def test_fake_llm_replies_are_plain_words_carrying_the_key() -> None:
    tokens = reply_tokens("k0123456789ab", 60)
    assert len(tokens) == 60
    assert reply_text("k0123456789ab", 3) == "Reply k0123456789ab w2"
    assert KEY_PATTERN.search("Turn 1, please answer request k0123456789ab.") is not None
    assert reply_tokens("k0123456789ab", 1) == ["Reply"]


def _spoken(count: int) -> Conversation:
    conversation = Conversation(conversation_id="bench_x", session_id="sess")
    for index in range(count):
        key = f"k{index:012x}"
        conversation.turns.append(
            TurnSample(turn_id=f"turn_{index}", key=key, text=f"say {key}", expected_reply=reply_text(key, 5))
        )
    return conversation


def _stored(conversation: Conversation, **changes: Any) -> ConversationDetail:
    turns = [
        TurnView(
            turn_id=turn.turn_id,
            kind="message",
            user_text=turn.text,
            reply_text=turn.expected_reply,
            status="completed",
        )
        for turn in conversation.turns
    ]
    if changes:
        turns[-1] = turns[-1].model_copy(update=changes)
    return ConversationDetail(conversation_id=conversation.conversation_id, turns=turns)


def test_history_check_accepts_exactly_what_was_said() -> None:
    conversation = _spoken(3)
    assert defects_of(_stored(conversation), conversation) == []


@pytest.mark.parametrize(
    ("changes", "found"),
    [
        ({"status": "failed"}, "reply failed"),
        ({"reply_text": "Reply"}, "reply text"),
        ({"user_text": "something else"}, "caller text"),
        ({"turn_id": "turn_other"}, "expected message turn_2"),
    ],
)
def test_history_check_names_what_is_wrong(changes: dict[str, Any], found: str) -> None:
    conversation = _spoken(3)
    assert found in "; ".join(defects_of(_stored(conversation, **changes), conversation))


def test_history_check_counts_lost_turns() -> None:
    conversation = _spoken(3)
    stored = _stored(conversation)
    stored.turns.pop()
    assert defects_of(stored, conversation) == ["2 stored turns for 3 spoken"]
    assert defects_of(None, conversation) == ["nothing stored"]


def test_floor_verifies_signatures_as_the_project_signs_them() -> None:
    body = b'{"type":"message"}'
    now = 1_800_000_000
    header = sign(body, "s3cret", timestamp=now)
    assert verified(body, header, b"s3cret", now=now)
    assert verified(body, header.upper().replace("T=", "t=").replace("V1=", "v1="), b"s3cret", now=now)
    assert not verified(body + b" ", header, b"s3cret", now=now)
    assert not verified(body, header, b"other", now=now)
    assert not verified(body, header, b"s3cret", now=now + 301)
    assert not verified(body, None, b"s3cret", now=now)
    assert not verified(body, "t=abc,v1=00", b"s3cret", now=now)


def _figures(p50: float, p99: float, cpu: float, rate: float, to_llm: float = 1.0) -> RunFigures:
    return RunFigures(
        turns=10, overhead_p50=p50, overhead_p99=p99, cpu_ms_per_turn=cpu, turns_per_s=rate, to_llm_p50=to_llm
    )


def _suite(store: str, by_level: dict[int, RunFigures]) -> Suite:
    levels = [LevelResult(concurrency, [figures]) for concurrency, figures in by_level.items()]
    return Suite(store=store, store_url=f"{store}://", workers=1, pinning="not pinned", levels=levels)


def test_tables_show_each_figure_with_its_ratio_to_the_floor() -> None:
    floor = _suite("floor", {1: _figures(2.0, 4.0, 5.0, 1.2), 100: _figures(4.0, 30.0, 6.0, 100.0)})
    project = _suite("sqlite", {1: _figures(9.0, 12.0, 60.0, 1.2, 11.0), 100: _figures(15.0, 100.0, 13.0, 80.0)})
    ratios = floor_ratios(project.levels[0].summary, floor.levels[0].summary)
    assert ratios["overhead_p50"] == pytest.approx(4.5) and ratios["cpu_ms_per_turn"] == pytest.approx(12.0)
    table = markdown_table(project, floor)
    assert "| 9.0 (×4.5) |" in table and "| 60.00 (×12) |" in table and "11.0 (×11) + –" in table
    assert "| 80 (×0.80) |" in table and "| 100.0 (×3.3) |" in table
    assert "(×" not in markdown_table(floor, floor) and "goal" not in markdown_table(floor, floor)
    one, hundred = project.levels
    assert goal_misses(one, one.summary, floor.levels[0].summary) == ["→LLM>2", "p50>floor+3"]
    assert goal_misses(hundred, hundred.summary, floor.levels[1].summary) == ["CPU>2×floor"]
    slow = _figures(15.0, 151.0, 13.0, 79.0)
    assert goal_misses(hundred, slow, floor.levels[1].summary) == ["p99>150", "CPU>2×floor", "turns/s<0.8×floor"]
    assert goal_misses(hundred, slow, None) == ["p99>150"]


def _series(svg: str) -> dict[str, set[str]]:
    root = ElementTree.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    found: dict[str, set[str]] = {}
    for line in root.iter("{http://www.w3.org/2000/svg}polyline"):
        points = line.get("points", "").split()
        assert points and all(len(point.split(",")) == 2 for point in points)
        found.setdefault(line.get("data-panel", ""), set()).add(line.get("data-series", ""))
    return found


def test_chart_draws_every_store_and_the_floor_in_every_panel() -> None:
    floor = _suite("floor", {1: _figures(2.0, 4.0, 5.0, 1.2), 10: _figures(-0.5, 8.0, 5.5, 12.0)})
    memory = _suite("memory", {1: _figures(9.0, 12.0, 60.0, 1.2), 10: _figures(20.0, 1400.0, 40.0, 12.0)})
    sqlite = _suite("sqlite", {1: _figures(9.0, 12.0, 60.0, 1.2), 10: _figures(20.0, 900.0, 40.0, 12.0)})
    series = _series(chart_svg([memory, sqlite], floor))
    assert series == {name: {"memory", "sqlite", "floor"} for name, _ in PANELS}
    assert _series(chart_svg([sqlite], None)) == {name: {"sqlite"} for name, _ in PANELS}


@pytest.fixture
def floor_backend() -> Iterator[tuple[FakeLLMProcess, FloorProcess]]:
    fake = FakeLLMProcess(ttft_ms=50, tokens=40, token_ms=20, cores=None)
    try:
        floor = FloorProcess(llm_base_url=fake.base_url, cores=None)
        try:
            yield fake, floor
        finally:
            floor.stop()
    finally:
        fake.stop()


def _signed(floor: FloorProcess, turn_id: str, text: str, secret: str | None = None) -> dict[str, Any]:
    body = json.dumps(
        {"type": "message", "session_id": "s1", "conversation_id": "c1", "turn_id": turn_id, "text": text}
    ).encode()
    return {"content": body, "headers": {SIGNATURE_HEADER: sign(body, secret or floor.secret)}}


@pytest.mark.slow
def test_floor_streams_each_delta_keeps_history_and_cancels_the_llm_on_hang_up(
    floor_backend: tuple[FakeLLMProcess, FloorProcess],
) -> None:
    fake, floor = floor_backend
    with httpx.Client(base_url=floor.base, timeout=30) as http:
        assert http.post("/api/agent", **_signed(floor, "t1", "hi", secret="wrong")).status_code == 401
        response = http.post("/api/agent", **_signed(floor, "t1", "first k0123456789ab"))
        events = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: ")]
        assert [event["content"] for event in events[:-1]] == reply_tokens("k0123456789ab", 40)
        assert events[-1] == {"type": "response.end", "turn_id": "t1"}
        with http.stream("POST", "/api/agent", **_signed(floor, "t2", "second k0123456789ac")) as stream:
            next(stream.iter_raw())  # The first word arrived: hang up.
        deadline = time.monotonic() + 20
        while True:
            timings = {row[0]: row for row in httpx.get(f"{fake.base}/stats").json()["timings"]}
            if timings["k0123456789ac"][5] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert timings["k0123456789ac"][5] is True, "the LLM stream was not closed when the caller hung up"
        assert timings["k0123456789ac"][4] < 40
        turns = http.get("/history/c1").json()["turns"]
        assert [(turn["turn_id"], turn["status"]) for turn in turns] == [("t1", "completed"), ("t2", "interrupted")]
        assert turns[0]["reply_text"] == reply_text("k0123456789ab", 40)
        assert http.get("/history/nobody").status_code == 404


@pytest.mark.slow
def test_bench_at_ci_size_reports_every_figure_and_loses_nothing(tmp_path: Path) -> None:
    figures, markdown, chart = tmp_path / "bench.json", tmp_path / "results.md", tmp_path / "charts" / "bench.svg"
    argv = [sys.executable, "-m", "bench", "--stores", "memory,sqlite", "--levels", "1,2", "--turns", "2"]
    argv += [
        "--runs",
        "1",
        "--warmup",
        "2",
        "--scale-workers",
        "0",
        "--history-exchanges",
        "3",
        "--json",
        str(figures),
        "--markdown",
        str(markdown),
        "--chart",
        str(chart),
    ]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    document = json.loads(figures.read_text())
    assert document["machine"]["cores"] >= 1
    assert document["settings"]["turns"] == 2
    assert [suite["store"] for suite in document["suites"]] == ["memory", "sqlite"]
    assert document["floor"]["store"] == "floor"
    floor_medians = {level["concurrency"]: level["median"] for level in document["floor"]["levels"]}
    for suite in [*document["suites"], document["floor"]]:
        assert [level["concurrency"] for level in suite["levels"]] == [1, 2]
        for level in suite["levels"]:
            if suite["store"] != "floor":
                base = floor_medians[level["concurrency"]]
                for name, ratio in level["vs_floor"].items():
                    assert ratio == pytest.approx(level["median"][name] / base[name]), name
                assert set(level["vs_floor"]) >= {"overhead_p50", "overhead_p99", "cpu_ms_per_turn", "turns_per_s"}
            median = level["median"]
            assert median["turns"] == 2 * level["concurrency"]
            assert median["errors"] == 0, median["error_samples"]
            assert median["defects"] == 0, median["defect_samples"]
            for name in ("overhead_p50", "overhead_p99", "llm_overhead_p50", "to_llm_p50", "from_llm_p50"):
                assert median[name] is not None and -5 < median[name] < 10_000, name
            assert median["turn_p50"] > 200 + 10 * 59  # the fake's own pace: nothing can be faster
            assert median["turns_per_s"] > 0
            assert median["cpu_ms_per_turn"] > 0
            assert median["rss_mib"] > 10
            assert median["load_core_pct"] > 0
        history = suite["history"]
        assert history["exchanges"] == 3 and len(history["to_llm"]) == 3 + 5 and history["errors"] == 0
        assert all(value is not None and 0 < value < 10_000 for value in history["to_llm"])
        assert history["first_p50"] == pytest.approx(statistics.median(history["to_llm"][:5]))
        assert history["last_p50"] == pytest.approx(statistics.median(history["to_llm"][3:]))

    section = markdown.read_text()
    assert section.startswith("## Results\n")
    assert "### memory (1 worker)" in section and "### sqlite (1 worker)" in section and "### floor" in section
    assert section.count("\n| 1 | ") == 3 and section.count("\n| 2 | ") == 3
    assert section.count(" (×") >= 2 * 2 * 4  # two stores, two levels, at least four ratios per row
    assert "overhead p50" in result.stdout and "floor" in result.stdout
    assert section.count("webhook → LLM request p50, one conversation: ") == 3
    assert _series(chart.read_text()) == {name: {"memory", "sqlite", "floor"} for name, _ in PANELS}


@pytest.mark.slow
def test_layers_bench_reports_every_layer_at_every_history(tmp_path: Path) -> None:
    figures, markdown = tmp_path / "layers.json", tmp_path / "layers.md"
    argv = [sys.executable, "-m", "bench.layers", "--tokens", "5", "--token-ms", "0", "--replies", "2", "--runs", "1"]
    argv += ["--histories", "0,3", "--stream-history", "1", "--json", str(figures), "--markdown", str(markdown)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    document = json.loads(figures.read_text())
    layers = list(LAYERS)
    assert layers[:3] == ["aiohttp", "lean model", "pydantic-ai agent"]
    assert [figure["layer"] for figure in document["streaming"]] == layers
    assert {figure["history"] for figure in document["streaming"]} == {1}
    assert [(figure["layer"], figure["history"]) for figure in document["requests"]] == [
        (layer, history) for history in (0, 3) for layer in layers
    ]
    for figure in document["streaming"] + document["requests"]:
        assert 0 < figure["cpu_ms"] < 5_000 and figure["wall_ms"] > 0, figure
    table = markdown.read_text()
    assert "| turn (sqlite) |" in table and "history 3" in table
    assert "CPU per reply" in result.stdout


def test_layers_bench_refuses_bad_options() -> None:
    argv = [sys.executable, "-m", "bench.layers", "--histories", "zero"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--histories" in result.stderr
