"""`layercode-agent simulate` without a server: scenario files, their errors, the JUnit report, usage errors."""

from __future__ import annotations

import io
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from layercode_agent.cli import main
from layercode_agent.cli.simulate import junit_xml
from layercode_agent.simulate import (
    DataStep,
    EndStep,
    SayStep,
    ScenarioError,
    ScenarioResult,
    StepResult,
    _words_heard,
    load_scenarios,
)

from ..fakes.net import free_port
from .hostile import ODD_SECRET, RAW_CONTROL

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"


def write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problem(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as raised:
        load_scenarios(path)
    message = str(raised.value)
    assert message.startswith(str(path)), message
    return message


def test_the_shipped_examples_are_valid() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert [path.name for path in files] == ["barge_in.yaml", "greeting.yaml"]
    scenarios = [scenario for path in files for scenario in load_scenarios(path)]
    assert [scenario.name for scenario in scenarios] == ["barge-in", "greeting"]
    barge_in, greeting = scenarios
    assert barge_in.welcome is not None and barge_in.metadata == {"source": "simulate-example"}
    first = barge_in.steps[0]
    assert isinstance(first, SayStep) and first.interrupt_after_words == 3
    assert greeting.welcome is not None and greeting.welcome.expect.max_first_token_ms == 5000
    assert [type(step) for step in greeting.steps] == [SayStep, SayStep, DataStep, EndStep]
    spoken = greeting.steps[0]
    assert isinstance(spoken, SayStep)
    assert spoken.expect.regex == [r"\w"] and spoken.expect.not_contains == ["**", "`", "#"]
    assert all(scenario.source.endswith(".yaml") for scenario in scenarios)


def test_a_full_scenario_parses_with_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
steps:
  - say: Hi
    pause_ms: 50
    expect: {contains: hello, regex: 'h.llo', status: 200}
  - data: [1, 2]
  - end: true
""",
        name="my_flow.yaml",
    )
    (scenario,) = load_scenarios(path)
    assert scenario.name == "my_flow"  # named after the file
    assert scenario.welcome is None and scenario.conversation_id is None
    say, data, end = scenario.steps
    assert isinstance(say, SayStep) and say.pause_ms == 50
    assert say.expect.contains == ["hello"] and say.expect.regex == ["h.llo"]
    assert say.expect.ends_with_response_end is True and say.expect.status == 200
    assert isinstance(data, DataStep) and data.data == [1, 2]
    assert isinstance(end, EndStep)


def test_a_list_of_scenarios_under_scenarios(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
scenarios:
  - name: one
    welcome: {expect: {contains: hi}}
  - name: two
    conversation_id: conv_fixed
    welcome: false
    steps: [{say: hello}]
""",
    )
    one, two = load_scenarios(path)
    assert (one.name, two.name) == ("one", "two")
    assert one.welcome is not None and one.welcome.expect.contains == ["hi"]
    assert two.welcome is None and two.conversation_id == "conv_fixed"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("steps: [\n", ["scenario.yaml:2:1: not valid YAML"]),
        ("", ["expected a scenario", "found an empty file"]),
        ("- say: hi\n", ["found a list"]),
        ("name: x\n", ["scenario 'x': nothing to do"]),
        (
            "name: x\nsteps:\n  - say: hi\n  - say: hi\n    data: {}\n",
            ["scenario 'x', step 2: a step needs exactly one of the keys `say`, `data` or `end` (it has data, say)"],
        ),
        ("name: x\nsteps:\n  - pause_ms: 5\n", ["step 1: a step needs exactly one", "(it has pause_ms)"]),
        ("name: x\nsteps: [hello]\n", ["step 1: a step needs exactly one", "(found 'hello')"]),
        (
            "name: x\nsteps:\n  - say: hi\n    expect: {contain: hi}\n",
            ["scenario 'x', step 1 (say): expect: unknown key 'contain' (did you mean 'contains'?)"],
        ),
        ("name: x\nsteps:\n  - sey: hi\n", ["step 1", "(it has sey)"]),
        (
            "name: x\nsteps:\n  - say: hi\n    expect: {regex: '(unclosed'}\n",
            ["step 1 (say): expect.regex: invalid regular expression '(unclosed'"],
        ),
        (
            "name: x\nsteps:\n  - say: hi\n    interrupt_after_words: 0\n",
            ["step 1 (say): interrupt_after_words: Input should be greater than or equal to 1"],
        ),
        (
            "name: x\nsteps:\n  - say: hi\n    interrupt_after_words: 2\n    expect: {max_total_ms: 100}\n",
            ["step 1 (say): max_total_ms does not apply to an interrupted reply"],
        ),
        (
            "name: x\nsteps:\n  - data: {a: 1}\n    expect: {max_first_token_ms: 100}\n",
            ["step 1 (data): expect.max_first_token_ms applies to streamed turns (say, welcome) only"],
        ),
        ("name: x\nsteps:\n  - end: false\n", ["step 1 (end): end: Input should be True"]),
        ("name: x\nsteps:\n  - say: hi\n    pause_ms: -1\n", ["step 1 (say): pause_ms: Input should be greater"]),
        ("name: x\nwelcome: {expect: {status: 42}}\n", ["scenario 'x', welcome: expect.status: Input should be"]),
        ("name: x\nsteps: [{say: hi}]\nturns: 3\n", ["scenario 'x': unknown key 'turns'"]),
        ("scenarios: []\n", ["`scenarios:` must be a non-empty list"]),
        ("scenarios: [{steps: [{say: hi}]}]\nname: y\n", ["beside `scenarios:` the file may hold nothing else"]),
        (
            "scenarios:\n  - name: good\n    steps: [{say: hi}]\n  - name: bad\n    steps: [{say: 3}]\n  - 7\n",
            ["scenario 'bad', step 1 (say): say: Input should be a valid string", "scenario #3: expected a mapping"],
        ),
    ],
)
def test_invalid_scenarios_say_where_and_what(tmp_path: Path, text: str, fragments: list[str]) -> None:
    message = problem(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, message


def test_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"missing\.yaml: cannot read the file"):
        load_scenarios(tmp_path / "missing.yaml")


def test_words_heard_waits_for_a_whole_word() -> None:
    assert _words_heard("Once upon", 2) is None  # "upon" may still be growing
    assert _words_heard("Once upon ", 2) == "Once upon"
    assert _words_heard(" Once upon a", 2) == "Once upon"
    assert _words_heard("Once\nupon   a time", 3) == "Once upon a"
    assert _words_heard("", 1) is None


# --- The CLI's usage errors -----------------------------------------------------------------------------


def test_cli_rejects_a_bad_file_with_exit_2_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, "steps: [{say: hi}]\n", name="good.yaml")
    bad = write(tmp_path, "name: broken\nsteps:\n  - say: hi\n    expect: {contians: x}\n", name="bad.yaml")
    assert main(["simulate", str(good), str(bad), "--url", "http://127.0.0.1:9/api/agent", "--secret", "s"]) == 2
    captured = capsys.readouterr()
    assert "Invalid scenario file" in captured.err
    assert f"{bad}: scenario 'broken', step 1 (say): expect: unknown key 'contians'" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_cli_says_when_the_server_is_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = write(tmp_path, "steps: [{say: hi}]\n")
    url = f"http://127.0.0.1:{free_port()}/api/agent"
    assert main(["simulate", str(scenario), "--url", url, "--secret", "s"]) == 2
    err = capsys.readouterr().err
    assert f"Cannot reach {url}" in err and "make run" in err
    assert "Traceback" not in err


def test_cli_without_a_secret_explains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "empty"))
    scenario = write(tmp_path, "steps: [{say: hi}]\n")
    assert main(["simulate", str(scenario)]) == 2
    assert "No webhook secret" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate"], "Name at least one scenario file"),
        (["simulate", "x.yaml", "--concurrency", "0"], "--concurrency must be at least 1"),
        (["simulate", "x.yaml", "--timeout", "0"], "--timeout must be a positive number"),
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_url_that_is_not_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = write(tmp_path, "steps: [{say: hi}]\n")
    assert main(["simulate", str(scenario), "--url", "127.0.0.1:8000/api/agent", "--secret", "s"]) == 2
    assert "--url must be an http:// or https:// URL" in capsys.readouterr().err


# --- The JUnit report --------------------------------------------------------------------------------


def test_junit_report_is_valid_xml_with_one_case_per_scenario() -> None:
    passed = ScenarioResult("greets", "scenarios/a.yaml", "conv_a", planned=1, duration_ms=1500)
    passed.steps.append(StepResult(1, "say", "say 'hi'", status=200, text="Hello!", first_token_ms=12, total_ms=40))
    failed = ScenarioResult('cut <off> & "quoted"', "scenarios/b.yaml", "conv_b", planned=3, duration_ms=250)
    failed.steps.append(
        StepResult(
            1,
            "say",
            "say 'story'",
            status=200,
            text="Once upon",
            failures=["the reply does not contain 'dragon'", "took 900 ms, over max_total_ms 500\x1b[0m"],
        )
    )
    failed.steps.append(StepResult(2, "data", "data {}", failures=["request failed: ConnectError"]))

    root = ElementTree.fromstring(junit_xml([passed, failed]))

    assert root.tag == "testsuite"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "1", "0")
    assert root.get("time") == "1.750"
    first, second = root.findall("testcase")
    assert (first.get("classname"), first.get("name"), first.get("time")) == ("a", "greets", "1.500")
    assert first.find("failure") is None
    assert "step 1 (say 'hi') [status 200, first token 12 ms, total 40 ms] ok" in (first.findtext("system-out") or "")
    assert second.get("name") == 'cut <off> & "quoted"'
    failure = second.find("failure")
    assert failure is not None
    assert failure.get("message") == "step 1 (say 'story'): the reply does not contain 'dragon'"
    assert (failure.text or "").splitlines() == [
        "step 1 (say 'story'): the reply does not contain 'dragon'",
        "step 1 (say 'story'): took 900 ms, over max_total_ms 500\ufffd[0m",
        "step 2 (data {}): request failed: ConnectError",
        "1 step(s) not run",
    ]
    assert (second.findtext("system-out") or "").splitlines() == [
        "step 1 (say 'story') [status 200] FAILED: the reply does not contain 'dragon'; "
        "took 900 ms, over max_total_ms 500\ufffd[0m",
        "    'Once upon'",
        "step 2 (data {}) [no answer] FAILED: request failed: ConnectError",
        "    ''",
    ]


def test_what_a_backend_sends_never_drives_the_terminal(
    odd_backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = write(tmp_path, "name: odd\nsteps: [{say: hi}]\n")
    assert main(["simulate", str(scenario), "--url", f"{odd_backend}/no-end", "--secret", ODD_SECRET]) == 1
    captured = capsys.readouterr()
    assert RAW_CONTROL.search(captured.out + captured.err) is None, repr(captured.out)
    assert r"the stream ended without response.end (events: \x1b]0;owned\x07)" in " ".join(captured.out.split())


@pytest.mark.parametrize("way", ["--secret-file", "--secret-file -", "--secret -", "environment"])
def test_the_secret_can_stay_off_the_command_line(
    odd_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], way: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    scenario = write(tmp_path, "name: signed\nsteps: [{say: hi}]\n")
    args = ["simulate", str(scenario), "--url", f"{odd_backend}/api/agent"]
    if way == "--secret-file":
        (tmp_path / "secret").write_text(ODD_SECRET + "\n")
        args += ["--secret-file", "secret"]
    elif way.endswith(" -"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{ODD_SECRET}\n".encode())))
        args += way.split()
    else:
        monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", ODD_SECRET)
    assert main(args) == 0, capsys.readouterr().out
    # The backend refuses any other secret.
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", "whsec_wrong")
    assert main(["simulate", str(scenario), "--url", f"{odd_backend}/api/agent"]) == 1
