"""The out-of-the-box path: no keys, no .env, the embedded model answers a signed webhook."""

from __future__ import annotations

from pathlib import Path

import pytest

from layercode_agent.client import WebhookClient

from ..fakes.server_process import ServerProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_embedded_model_replies_with_no_configuration(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path / "data"), "AGENT_MODEL": "auto", "LAYERCODE_WEBHOOK_SECRET": ""}
    with ServerProcess(env, cwd=tmp_path, startup_timeout=120) as server:
        secret = (tmp_path / "data" / "dev-webhook-secret").read_text().strip()
        async with WebhookClient(server.url, secret, conversation_id="conv_local") as client:
            welcome = await client.start()
            reply = await client.say("Hello! What is the capital of France?")
        log = server.log
    assert welcome.types == ["response.tts", "response.end"]
    assert reply.types[-1] == "response.end" and reply.types.count("response.end") == 1
    assert len(reply.text.split()) >= 3
    assert reply.types.count("response.tts") >= 3, "the embedded model streams token by token"
    assert "development secret generated" in log
    assert secret not in log
    assert "tiny offline demo model" in log
