"""`/api/conversations`, on conversations written by real turns through the webhook."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls

from layercode_agent.conversations import ConversationDetail

from .conftest import AppFactory

pytestmark = pytest.mark.anyio

TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_a_turn_can_be_read_back(make_app: AppFactory) -> None:
    async with make_app(admin_token=TOKEN) as app:
        client = app.client(conversation_id="conv_api", session_id="sess_1")
        await client.start(turn_id="welcome_1")
        await client.say("Hi", turn_id="turn_1")
        end = client.body("session.end", transcript=[{"role": "user", "text": "Hi"}], latency=321.0)
        assert (await client.post(end)).status_code == 200
        response = await app.http.get("/api/conversations/conv_api", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    detail = ConversationDetail.model_validate_json(response.content)
    assert [(t.turn_id, t.kind, t.user_text, t.reply_text, t.status) for t in detail.turns] == [
        ("welcome_1", "welcome", None, "Welcome aboard.", "completed"),
        ("turn_1", "message", "Hi", "Hello there, friend.", "completed"),
    ]
    assert (detail.turn_count, detail.last_status, detail.last_user_text) == (2, "completed", "Hi")
    assert detail.usage.requests == 1
    [event] = detail.session_events
    assert (event.event_type, event.session_id, event.payload["latency"]) == ("session.end", "sess_1", 321.0)
    assert detail.transcript == [{"role": "user", "text": "Hi"}]


async def test_a_tool_turn_lists_its_tools(make_app: AppFactory) -> None:
    async def with_tool(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if len(messages) == 1:
            yield {0: DeltaToolCall(name="current_time", json_args='{"timezone": "Europe/Paris"}')}
        else:
            yield "It is late in Paris."

    async with make_app(with_tool, admin_token=TOKEN) as app:
        client = app.client(conversation_id="conv_tool")
        await client.say("What time is it in Paris?", turn_id="tt")
        response = await app.http.get("/api/conversations/conv_tool", headers=AUTH)
    assert response.status_code == 200
    [turn] = response.json()["turns"]
    assert (turn["turn_id"], turn["status"]) == ("tt", "completed")
    assert turn["reply_text"].endswith("It is late in Paris.")
    [tool] = turn["tools"]
    assert tool["tool_name"] == "current_time" and tool["result"]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing Authorization header"),
        ({"Authorization": "Bearer wrong"}, "wrong token"),
        ({"Authorization": f"Basic {TOKEN}"}, "must be 'Bearer <ADMIN_TOKEN>'"),
        ({"Authorization": "Bearer "}, "must be 'Bearer <ADMIN_TOKEN>'"),
    ],
)
async def test_a_missing_or_wrong_token_is_401(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture, headers: dict[str, str], reason: str
) -> None:
    caplog.set_level(logging.WARNING, logger="layercode_agent")
    async with make_app(admin_token=TOKEN) as app:
        await app.client(conversation_id="conv_x").say("secret things")
        answers = [
            await app.http.get("/api/conversations", headers=headers),
            await app.http.get("/api/conversations/conv_x", headers=headers),
            await app.http.delete("/api/conversations/conv_x", headers=headers),
        ]
        still_there = await app.runtime.store.read_record("conv_x")
    for answer in answers:
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        body: dict[str, Any] = answer.json()
        assert body["error"] == "unauthorized" and reason in body["reason"]
        assert "secret things" not in answer.text
    assert still_there is not None
    assert "rejected admin request" in caplog.text
    assert TOKEN not in caplog.text


async def test_without_admin_token_the_routes_do_not_exist(make_app: AppFactory) -> None:
    async with make_app() as app:
        await app.client(conversation_id="conv_x").say("Hi")
        answers = [
            await app.http.get("/api/conversations", headers=AUTH),
            await app.http.get("/api/conversations/conv_x", headers=AUTH),
            await app.http.delete("/api/conversations/conv_x", headers=AUTH),
        ]
    assert [answer.status_code for answer in answers] == [404, 404, 404]


async def test_delete_then_get_is_404(make_app: AppFactory) -> None:
    async with make_app(admin_token=TOKEN) as app:
        client = app.client(conversation_id="conv_del")
        await client.say("Forget me")
        await client.post(client.body("session.update", recording_status="completed", recording_url="https://r/1"))
        deleted = await app.http.delete("/api/conversations/conv_del", headers=AUTH)
        after = await app.http.get("/api/conversations/conv_del", headers=AUTH)
        again = await app.http.delete("/api/conversations/conv_del", headers=AUTH)
        events = await app.runtime.store.session_events("conv_del")
    assert deleted.status_code == 204 and deleted.content == b""
    assert after.status_code == 404
    assert after.json() == {"error": "conversation not found", "conversation_id": "conv_del"}
    assert again.status_code == 404
    assert events == []


async def test_unknown_conversation_is_404(make_app: AppFactory) -> None:
    async with make_app(admin_token=TOKEN) as app:
        got = await app.http.get("/api/conversations/nobody", headers=AUTH)
        deleted = await app.http.delete("/api/conversations/nobody", headers=AUTH)
    assert got.status_code == 404 and got.json()["conversation_id"] == "nobody"
    assert deleted.status_code == 404


async def test_list_is_newest_first_and_limited(make_app: AppFactory) -> None:
    async with make_app(admin_token=TOKEN) as app:
        for name in ["conv_1", "conv_2", "conv_3"]:
            await app.client(conversation_id=name).say(f"Hello from {name}")
        everything = await app.http.get("/api/conversations", headers=AUTH)
        two = await app.http.get("/api/conversations", params={"limit": 2}, headers=AUTH)
        bad = await app.http.get("/api/conversations", params={"limit": 0}, headers=AUTH)
    assert everything.status_code == 200
    assert [s["conversation_id"] for s in everything.json()] == ["conv_3", "conv_2", "conv_1"]
    assert everything.json()[0] == {
        "conversation_id": "conv_3",
        "updated_at": everything.json()[0]["updated_at"],
        "turn_count": 1,
        "last_status": "completed",
        "last_user_text": "Hello from conv_3",
    }
    assert [s["conversation_id"] for s in two.json()] == ["conv_3", "conv_2"]
    assert bad.status_code == 422
