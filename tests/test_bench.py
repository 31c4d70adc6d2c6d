"""The latency bench (`bench/`, `make bench`) at CI size, and the pure pieces it computes its figures with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench._figures import percentile
from bench._history import defects_of
from bench.fake_llm import KEY_PATTERN, reply_text, reply_tokens
from bench.load import Conversation, TurnSample
from layercode_agent.conversations import ConversationDetail, TurnView

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


@pytest.mark.slow
def test_bench_at_ci_size_reports_every_figure_and_loses_nothing(tmp_path: Path) -> None:
    figures, markdown = tmp_path / "bench.json", tmp_path / "results.md"
    argv = [sys.executable, "-m", "bench", "--stores", "memory,sqlite", "--levels", "1,2", "--turns", "2"]
    argv += [
        "--runs",
        "1",
        "--warmup",
        "2",
        "--scale-workers",
        "0",
        "--json",
        str(figures),
        "--markdown",
        str(markdown),
    ]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    document = json.loads(figures.read_text())
    assert document["machine"]["cores"] >= 1
    assert document["settings"]["turns"] == 2
    assert [suite["store"] for suite in document["suites"]] == ["memory", "sqlite"]
    for suite in document["suites"]:
        assert [level["concurrency"] for level in suite["levels"]] == [1, 2]
        for level in suite["levels"]:
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

    section = markdown.read_text()
    assert section.startswith("## Results\n")
    assert "### memory (1 worker)" in section and "### sqlite (1 worker)" in section
    assert section.count("\n| 1 | ") == 2 and section.count("\n| 2 | ") == 2
    assert "overhead p50" in result.stdout


@pytest.mark.slow
def test_layers_bench_reports_every_layer_at_every_history(tmp_path: Path) -> None:
    figures, markdown = tmp_path / "layers.json", tmp_path / "layers.md"
    argv = [sys.executable, "-m", "bench.layers", "--tokens", "5", "--token-ms", "0", "--replies", "2", "--runs", "1"]
    argv += ["--histories", "0,3", "--stream-history", "1", "--json", str(figures), "--markdown", str(markdown)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    document = json.loads(figures.read_text())
    layers = ["httpx", "openai", "pydantic-ai model", "pydantic-ai agent", "turn (memory)", "turn (sqlite)"]
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
