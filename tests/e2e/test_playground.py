"""The browser playground, in a real headless Chromium, against the real server and the OpenAI-compatible fake.

The page is driven as a person would use it (type, press Enter, press Stop, End), and then two views of
the conversation are checked exactly, as the integrity tests do: the stored turn records, and what the
LLM was sent. Speech is replaced by a recording stub (headless Chromium has no audio), then muted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from layercode_agent.protocol import SSEParser

from ..fakes.history import Row, dialogue, session_events, stored
from ..fakes.openai_server import FakeOpenAI, Reply
from ..fakes.server_process import ServerProcess, server_env, sqlite_url

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "whsec_playground_e2e"
WELCOME = "Welcome to the playground. What shall we talk about?"
MARK = "[interrupted]"
TIMEOUT = 30_000  # ms, for anything the page waits on; generous because CI CPUs are shared
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

STORY = (
    "Once upon a time, a lighthouse keeper named Ada kept a lamp burning on a rock far out at sea. Every night "
    "she climbed the hundred and twelve steps, wound the clockwork, polished the great lens and watched the "
    "ships pass safely by, and every morning she wrote a line in her logbook about the weather, the birds and "
    "the colour of the water before she went to sleep."
)

TIPS = (
    "Here are some ways to sleep better. Go to bed and get up at the same time every day, even at weekends. "
    "Keep the bedroom dark, quiet and cool. Put screens away an hour before bed, skip coffee after lunch, and "
    "if you cannot sleep after twenty minutes, get up and read something calm until you feel tired."
)

# Headless Chromium cannot play audio; this stub records what the page asks it to say and "speaks" at once.
SPEECH_STUB = """
(() => {
  const spoken = [];
  Object.defineProperty(window, "__spoken", { value: spoken });
  const synth = {
    speaking: false, pending: false, paused: false,
    speak(utterance) {
      spoken.push(utterance.text);
      setTimeout(() => { utterance.onstart?.(new Event("start")); utterance.onend?.(new Event("end")); }, 0);
    },
    cancel() {}, pause() {}, resume() {}, getVoices() { return []; },
    addEventListener() {}, removeEventListener() {}, dispatchEvent() { return true; },
  };
  Object.defineProperty(window, "speechSynthesis", { value: synth, configurable: true });
})();
"""


def chromium_executable() -> str:
    """Debian's Chromium (CI installs it with apt); Playwright's own browser download cannot work here."""
    configured = os.environ.get("CHROMIUM_PATH")
    if configured:
        if not Path(configured).is_file():
            pytest.fail(f"CHROMIUM_PATH={configured} does not exist")
        return configured
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "The playground tests need Chromium: sudo apt-get install chromium (Debian/Ubuntu), "
            "or set CHROMIUM_PATH to a Chromium or Chrome executable."
        )
    return found


@asynccontextmanager
async def chromium() -> AsyncGenerator[Browser]:
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_executable(), args=args, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


def playground_env(fake_llm: FakeOpenAI, tmp_path: Path) -> tuple[dict[str, str], str]:
    store_url = sqlite_url(tmp_path / "data")
    env = server_env(fake_llm, tmp_path / "data", secret=SECRET, welcome=WELCOME, store_url=store_url)
    return {**env, "PLAYGROUND": "true"}, store_url


# --- What the store holds and what the LLM was sent ----------------------------------------------------------


def turn_rows(rows: list[Row], turn_id: str) -> list[tuple[str | None, str | None, str]]:
    return [(role, status, text) for role, status, text, meta in rows if meta.get("turn_id") == turn_id]


async def wait_for_status(store_url: str, conversation_id: str, turn_id: str, status: str) -> None:
    """Poll the store until the reply of `turn_id` has `status` (the server writes it when the abort reaches it)."""
    deadline = time.monotonic() + 30
    while True:
        rows = turn_rows(await stored(store_url, conversation_id), turn_id)
        if ("assistant", status) in [(role, got) for role, got, _ in rows]:
            return
        assert time.monotonic() < deadline, f"turn {turn_id} never became {status}: {rows}"
        await asyncio.sleep(0.1)


# --- Driving the page --------------------------------------------------------------------------------------


def agent_turns(page: Page) -> Locator:
    return page.get_by_test_id("turn-agent")


async def say(page: Page, text: str) -> None:
    await page.get_by_test_id("message-input").fill(text)
    await page.get_by_test_id("message-input").press("Enter")


async def finished_reply(page: Page, index: int) -> tuple[Locator, str]:
    """Wait for agent turn `index` to finish; return it with its text."""
    turn = agent_turns(page).nth(index)
    await expect(turn).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    return turn, (await turn.get_by_test_id("heard").text_content() or "")


async def words_streaming(page: Page, index: int, count: int) -> Locator:
    """Wait until agent turn `index` is streaming and shows at least `count` words."""
    turn = agent_turns(page).nth(index)
    pattern = re.compile(rf"^\s*(\S+\s+){{{count - 1},}}\S+")
    await expect(turn.get_by_test_id("heard")).to_have_text(pattern, timeout=TIMEOUT)
    await expect(turn).to_have_attribute("data-state", "streaming")
    return turn


async def interrupted_text(turn: Locator) -> str:
    await expect(turn).to_have_attribute("data-state", "interrupted", timeout=TIMEOUT)
    await expect(turn.get_by_test_id("badge")).to_have_text("interrupted")
    heard = await turn.get_by_test_id("heard").text_content() or ""
    assert heard and heard == heard.strip()
    return heard


# --- The conversation ------------------------------------------------------------------------------------


async def test_a_typed_conversation_with_barge_in_in_a_real_browser(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    story = [f" {word}" for word in STORY.split()]
    second_story = [f" {word}" for word in TIPS.split()]
    fake_llm.script(
        Reply(tokens=["Hi!", " Nice", " to", " meet", " you.", " What", " can", " I", " do?"]),
        Reply(tool_call=("current_time", {"timezone": "Europe/London"})),
        Reply(tokens=["It", " is", " ten", " past", " nine", " in", " London."]),
        Reply(tokens=story, token_delay=0.15),
        Reply(tokens=["Of", " course,", " go", " ahead."]),
        Reply(tokens=second_story, token_delay=0.15),
        Reply(tokens=["Okay,", " I", " will", " keep", " it", " short."]),
    )
    env, store_url = playground_env(fake_llm, tmp_path)
    ARTIFACTS.mkdir(exist_ok=True)
    with ServerProcess(env, cwd=tmp_path) as server:
        async with chromium() as browser:
            context = await browser.new_context(viewport={"width": 1100, "height": 1040}, color_scheme="light")
            await context.add_init_script(SPEECH_STUB)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            await page.goto(f"http://localhost:{server.port}/playground")

            # The welcome, streamed from session.start and spoken.
            welcome, welcome_text = await finished_reply(page, 0)
            assert welcome_text == WELCOME
            await expect(welcome.get_by_test_id("latency")).to_have_text(re.compile(r"first word .+ · total .+"))
            assert await page.evaluate("window.__spoken") == ["Welcome to the playground. ", WELCOME.split(". ")[1]]
            conversation_id = await page.get_by_test_id("conversation-id").text_content() or ""
            assert conversation_id.startswith("conv_")
            mute = page.get_by_test_id("mute")
            await mute.click()
            await expect(mute).to_have_attribute("aria-pressed", "true")

            # A typed message: the reply streams in, with its latency line.
            await say(page, "Hello!")
            await expect(page.get_by_test_id("turn-user").last).to_have_text(re.compile("Hello!"))
            hello, hello_text = await finished_reply(page, 1)
            assert hello_text == "Hi! Nice to meet you. What can I do?"
            await expect(hello.get_by_test_id("latency")).to_have_text(
                re.compile(r"^first word \d+(\.\d+)? m?s · total \d+(\.\d+)? m?s$")
            )

            # A tool call: its response.data events show up under the reply.
            await say(page, "What time is it in London?")
            clock, clock_text = await finished_reply(page, 2)
            assert clock_text.endswith("It is ten past nine in London.")
            await expect(clock.get_by_test_id("turn-data")).to_have_text("tool current_time: running → done")

            # Barge-in by typing while the long reply streams.
            await say(page, "Tell me a long story.")
            story_turn = await words_streaming(page, 3, 5)
            story_turn_id = await story_turn.get_attribute("data-turn-id") or ""
            await say(page, "Wait, can I ask something?")
            heard = await interrupted_text(story_turn)
            assert STORY.startswith(heard)
            assert len(heard.split()) < len(story)
            await expect(story_turn.get_by_test_id("latency")).to_have_text(re.compile("cut off after"))
            after_barge_in = page.get_by_test_id("turn-user").last
            barge_in_turn_id = await after_barge_in.get_attribute("data-turn-id") or ""
            _, reply_text = await finished_reply(page, 4)
            assert reply_text == "Of course, go ahead."
            # The page stopped reading: no words arrived after the interruption.
            assert await story_turn.get_by_test_id("heard").text_content() == heard

            # The Stop button interrupts without sending; the abort reaches the server through the proxy.
            await say(page, "Any tips for sleeping better?")
            tips = await words_streaming(page, 5, 4)
            tips_turn_id = await tips.get_attribute("data-turn-id") or ""
            await page.get_by_test_id("stop").click()
            heard_tips = await interrupted_text(tips)
            await expect(page.get_by_test_id("stop")).to_be_disabled()
            await wait_for_status(store_url, conversation_id, tips_turn_id, "interrupted")
            tips_request = fake_llm.received[5]
            assert tips_request.tokens_sent < len(second_story), "the LLM stream was not cancelled"
            await say(page, "Sorry, keep it short.")
            assert TIPS.startswith(heard_tips)
            _, short_text = await finished_reply(page, 6)
            assert short_text == "Okay, I will keep it short."

            # Client data: a `data` webhook whose JSON answer passes through the proxy.
            await page.get_by_text("Send client data").click()
            await page.get_by_test_id("data-input").fill('{"action": "ping"}')
            await page.get_by_test_id("send-data").click()
            await expect(page.get_by_test_id("data-reply")).to_contain_text('"type":"response.data"')

            await page.get_by_test_id("data-form").locator("..").locator("summary").click()
            await page.get_by_test_id("message-input").blur()
            await page.screenshot(path=str(ARTIFACTS / "playground.png"))
            await page.set_viewport_size({"width": 375, "height": 760})
            await page.screenshot(path=str(ARTIFACTS / "playground-mobile.png"))
            # Nothing overflows sideways on a phone.
            assert await page.evaluate("document.documentElement.scrollWidth") <= 375

            # End: session.end with the session's transcript.
            await page.get_by_test_id("end").click()
            await expect(page.get_by_test_id("session-ended")).to_be_visible(timeout=TIMEOUT)
            await expect(page.get_by_test_id("message-input")).to_be_disabled()
            assert errors == []
        log = server.log

    # The store: the interrupted replies hold what the page showed, followed by the next turn.
    rows = await stored(store_url, conversation_id)
    assert turn_rows(rows, story_turn_id) == [
        ("user", None, "Tell me a long story."),
        ("assistant", "interrupted", heard),
    ]
    story_reply = next(meta for role, _, _, meta in rows if role == "assistant" and meta["turn_id"] == story_turn_id)
    assert story_reply["text_heard"] == heard
    assert turn_rows(rows, barge_in_turn_id) == [
        ("user", None, "Wait, can I ask something?"),
        ("assistant", "completed", "Of course, go ahead."),
    ]
    order = [meta.get("turn_id") for _, _, _, meta in rows]
    assert order.index(barge_in_turn_id) > max(i for i, turn in enumerate(order) if turn == story_turn_id)
    assert ("assistant", "interrupted", heard_tips) in turn_rows(rows, tips_turn_id)

    # The LLM: each interrupted reply reaches the next request as heard, ending in the mark.
    assert dialogue(fake_llm.received[4], words_only=True)[-2:] == [
        ("assistant", f"{heard} {MARK}"),
        ("user", "Wait, can I ask something?"),
    ]
    assert dialogue(fake_llm.received[6], words_only=True)[-2:] == [
        ("assistant", f"{heard_tips} {MARK}"),
        ("user", "Sorry, keep it short."),
    ]

    # session.end carried the page's transcript in Layercode's shape.
    events = await session_events(store_url, conversation_id)
    ends = [event for event in events if event.event_type == "session.end"]
    assert len(ends) == 1
    transcript = ends[0].payload["transcript"]
    assert all(set(entry) == {"role", "text", "timestamp"} for entry in transcript)
    assert all(isinstance(entry["timestamp"], int) for entry in transcript)
    assert [(entry["role"], entry["text"]) for entry in transcript[:3]] == [
        ("assistant", WELCOME),
        ("user", "Hello!"),
        ("assistant", "Hi! Nice to meet you. What can I do?"),
    ]
    assert ("assistant", heard) in [(entry["role"], entry["text"]) for entry in transcript]
    assert "Traceback" not in log
    assert SECRET not in log


async def test_a_reload_continues_the_conversation_in_a_new_session(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    fake_llm.script(Reply(tokens=["Nice", " to", " meet", " you,", " Ada."]), Reply(tokens=["You", " are", " Ada."]))
    env, store_url = playground_env(fake_llm, tmp_path)
    with ServerProcess(env, cwd=tmp_path) as server:
        async with chromium() as browser:
            context = await browser.new_context(viewport={"width": 900, "height": 700})
            await context.add_init_script(SPEECH_STUB)
            page = await context.new_page()
            await page.goto(f"http://127.0.0.1:{server.port}/playground")
            await finished_reply(page, 0)
            conversation_id = await page.get_by_test_id("conversation-id").text_content() or ""
            await say(page, "I am Ada.")
            await finished_reply(page, 1)
            await page.reload()  # pagehide sends session.end (keepalive); the new page starts a new session
            await finished_reply(page, 0)
            assert await page.get_by_test_id("conversation-id").text_content() == conversation_id
            await expect(page.get_by_test_id("note").first).to_contain_text(
                f"Continuing conversation {conversation_id}"
            )
            await say(page, "Who am I?")
            _, text = await finished_reply(page, 1)
            assert text == "You are Ada."

            # A new conversation starts afresh.
            await page.get_by_test_id("new-conversation").click()
            await expect(page.get_by_test_id("turn-user")).to_have_count(0)
            await finished_reply(page, 0)
            assert await page.get_by_test_id("conversation-id").text_content() != conversation_id

    assert ("user", "I am Ada.") in dialogue(fake_llm.received[1], words_only=True)
    events = await session_events(store_url, conversation_id)
    sessions = {event.payload["session_id"] for event in events if event.event_type == "session.end"}
    assert len(sessions) == 2, "the reload and the new conversation each ended a session"


async def test_aborting_the_playground_request_aborts_the_webhook(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    # No browser: what the page's AbortController does, with httpx closing the request mid-stream.
    story = [f" {word}" for word in STORY.split()]
    fake_llm.script(Reply(tokens=story, token_delay=0.1))
    env, store_url = playground_env(fake_llm, tmp_path)
    body = {
        "type": "message",
        "session_id": "sess_abort",
        "conversation_id": "conv_abort",
        "turn_id": "turn_abort",
        "text": "Tell me a long story.",
    }
    with ServerProcess(env, cwd=tmp_path) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as http:
            received: list[dict[str, Any]] = []
            async with http.stream(
                "POST",
                "/playground/api/agent",
                content=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            ) as response:
                assert response.status_code == 200
                parser = SSEParser()
                async for chunk in response.aiter_raw():
                    received.extend(parser.feed(chunk))
                    if sum(event["type"] == "response.tts" for event in received) >= 3:
                        break
            await wait_for_status(store_url, "conv_abort", "turn_abort", "interrupted")
        log = server.log
    assert fake_llm.received[0].tokens_sent < len(story)
    assert "Traceback" not in log
