"""The streaming chat WebSocket: tokens as the model writes, tool events, then the result."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.brain.llm_server import ScriptedLLM
from tests.support import LiveServer


def test_chat_socket_streams_tokens_and_tool_events(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("ws-a")
    pid = probe.probe_id
    llm.script = [
        {"tools": [("run_command", {"probe": pid, "command": "uptime", "reason": "asked"})]},
        {"text": "The host has been up for a while, all fine."},
    ]
    url = fleet_server.url.replace("http://", "ws://") + "/ws/chat"
    headers = {"Authorization": f"Bearer {fleet_server.admin_key}"}
    events: list[dict[str, Any]] = []
    with connect(url, additional_headers=headers, open_timeout=10) as socket:
        socket.send(json.dumps({"probe": pid, "message": "uptime?"}))
        while not events or events[-1]["type"] not in ("done", "error"):
            events.append(json.loads(socket.recv(timeout=60)))
        socket.send(json.dumps({"probe": pid}))  # invalid: no message
        assert json.loads(socket.recv(timeout=10))["type"] == "error"
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done", events
    tool = next(e for e in events if e["type"] == "tool")
    assert tool["event"] == "command_result" and tool["data"]["result"]["status"] == "completed"
    tokens = "".join(e["text"] for e in events if e["type"] == "token")
    assert tokens == "The host has been up for a while, all fine."
    assert kinds.count("token") > 1  # streamed in pieces, not in one block
    assert kinds.index("tool") < kinds.index("token")
    assert events[-1]["answer"] == tokens and events[-1]["session_id"]
    with pytest.raises(InvalidStatus):
        connect(url, open_timeout=10)
