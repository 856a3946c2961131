"""Probe chat (persistent sessions) and fleet chat by tag, with real probes and the scripted
LLM on both wire formats; and the 503 that explains how to configure a provider."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.brain.helpers import Background, dispatches, pending_approval, record_clients
from tests.brain.llm_server import ScriptedLLM, tool_results
from tests.support import LiveServer


def test_probe_chat_keeps_a_persistent_session(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("chat-a")
    pid = probe.probe_id
    llm.script = [
        {"tools": [("run_command", {"probe": pid, "command": "uptime", "reason": "asked"})]},
        {"text": "It has been up for a while."},
        {"text": "You asked about uptime."},
    ]
    first = admin.post(f"/api/v1/probes/{pid}/chat", json={"message": "How long is it up?"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["answer"] == "It has been up for a while." and body["session_id"]
    assert body["steps"][0]["tools"][0]["result"]["status"] == "completed"
    second = admin.post(
        f"/api/v1/probes/{pid}/chat",
        json={"message": "What did I ask?", "session_id": body["session_id"]},
    ).json()
    assert second["session_id"] == body["session_id"]
    assert second["answer"] == "You asked about uptime."
    # The model saw the whole first exchange, including the tool result, again.
    history = str(llm.requests[-1]["messages"])
    assert "How long is it up?" in history and "It has been up for a while." in history
    assert "load average" in tool_results(llm.requests[-1])[0]
    # The probe's context (policy, health) is in the system prompt.
    system = str(llm.requests[0].get("system") or llm.requests[0]["messages"][0]["content"])
    assert pid in system and "observe-only" in system
    later = str(llm.requests[-1].get("system") or llm.requests[-1]["messages"][0]["content"])
    assert "Recent commands:" in later and "uptime" in later.split("Recent commands:")[1]
    sessions = admin.get(f"/api/v1/probes/{pid}/chat/sessions").json()
    assert [s["id"] for s in sessions] == [body["session_id"]]
    assert len(sessions[0]["messages"]) == 6
    unknown = admin.post(f"/api/v1/probes/{pid}/chat", json={"message": "hi", "session_id": "nope"})
    assert unknown.status_code == 404


def test_chat_rm_rf_ends_as_a_pending_approval(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("chat-rm", max_level="remediate", policy="full-remediate")
    victim = tmp_path / "x"
    victim.mkdir()
    llm.script = [
        {
            "tools": [
                (
                    "run_command",
                    {
                        "probe": probe.probe_id,
                        "command": "rm",
                        "args": ["-rf", str(victim)],
                        "reason": "user asked",
                    },
                )
            ]
        },
        {"text": "Removed."},
    ]
    chat = Background(
        admin, f"/api/v1/probes/{probe.probe_id}/chat", {"message": f"delete {victim}"}
    )
    approval = pending_approval(admin)
    assert approval["risk"] == "critical" and approval["rationale"]["origin"] == "chat"
    assert victim.exists() and dispatches(admin) == []
    admin.post(f"/api/v1/approvals/{approval['id']}/decide", json={"decision": "approve"})
    body = chat.result().json()
    call = body["steps"][0]["tools"][0]
    assert call["approval"]["status"] == "dispatched" and call["result"]["exit_code"] == 0
    assert not victim.exists() and len(dispatches(admin)) == 1


def test_fleet_chat_by_tag_fans_out_through_the_gate(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM
) -> None:  # type: ignore[no-untyped-def]
    web = [spawn_probe(f"fc-web-{i}", tags="web", policy="unattended") for i in range(2)]
    spawn_probe("fc-db", tags="db")
    llm.script = [
        {"tools": [("run_on_tag", {"tag": "web", "command": "uptime", "reason": "check"})]},
        {"text": "Both web hosts are up."},
    ]
    response = admin.post("/api/v1/fleet/chat", json={"message": "web uptime?", "tag": "web"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["target"] == "tag:web" and body["answer"] == "Both web hosts are up."
    call = body["steps"][0]["tools"][0]
    assert call["decision"] == "allow"
    assert set(call["results"]) == {p.probe_id for p in web}
    assert all(r["status"] == "completed" for r in call["results"].values())
    assert len(dispatches(admin)) == 2
    # Only the tag's probes are listed to the model.
    system = str(llm.requests[0].get("system") or llm.requests[0]["messages"][0]["content"])
    assert "fc-web-0" in system and "fc-db" not in system
    missing = admin.post("/api/v1/fleet/chat", json={"message": "x", "tag": "nothing"})
    assert missing.status_code == 404


def test_chats_share_one_client_and_its_connection(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Building an SDK client costs an SSL context (tens of milliseconds of CPU on the event
    # loop) and a new connection: probe chat, fleet chat and a task on one profile share one.
    built = record_clients(monkeypatch)
    pid = spawn_probe("chat-pool").probe_id
    llm.script = [{"text": "one"}, {"text": "two"}, {"text": "three"}, {"text": "four"}]
    for path, body in [
        (f"/api/v1/probes/{pid}/chat", {"message": "a"}),
        (f"/api/v1/probes/{pid}/chat", {"message": "b"}),
        ("/api/v1/fleet/chat", {"message": "c"}),
        (f"/api/v1/probes/{pid}/task", {"goal": "d"}),
    ]:
        response = admin.post(path, json=body)
        assert response.status_code == 200, response.text
    assert [r["messages"][-1]["content"] for r in llm.requests] == ["a", "b", "c", "Goal: d"]
    assert len(built) == 1 and not built[0].is_closed()
    # The upstream saw every call on one kept-alive connection.
    assert len(llm.connections) == 4 and len(set(llm.connections)) == 1


def test_shutdown_closes_the_clients(
    fleet_server: LiveServer, admin: httpx.Client, llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = record_clients(monkeypatch)
    llm.script = [{"text": "hello"}]
    response = admin.post("/api/v1/fleet/chat", json={"message": "hi"})
    assert response.status_code == 200, response.text
    assert built and not any(client.is_closed() for client in built)
    fleet_server.stop()
    assert all(client.is_closed() for client in built)


def test_no_provider_answers_503_with_how_to_configure(api: httpx.Client) -> None:
    for path, body in [
        ("/api/v1/probes/prb-00000000/chat", {"message": "hi"}),
        ("/api/v1/probes/prb-00000000/task", {"goal": "hi"}),
        ("/api/v1/fleet/chat", {"message": "hi"}),
    ]:
        response = api.post(path, json=body)
        assert response.status_code == 503, response.text
        assert "LEGATOR_LLM_PROVIDER" in response.json()["error"]["message"]
    assert api.get("/api/v1/fleet/summary").status_code == 200


def test_a_chat_that_ends_early_keeps_what_happened_in_its_session(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM
) -> None:  # type: ignore[no-untyped-def]
    """The provider fails after a command ran: the session still holds the message, the
    command and its result, and says how the turn ended; the next message goes on from it."""
    probe = spawn_probe("chat-ends")
    pid = probe.probe_id
    llm.script = [
        {"tools": [("run_command", {"probe": pid, "command": "uptime", "reason": "asked"})]},
        {"status": 400, "message": "context window exceeded"},
        {"text": "It was up; the last answer failed."},
    ]
    first = admin.post(f"/api/v1/probes/{pid}/chat", json={"message": "How long is it up?"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["status"] == "error" and body["session_id"]
    sessions = admin.get(f"/api/v1/probes/{pid}/chat/sessions").json()
    assert [s["id"] for s in sessions] == [body["session_id"]]
    stored = sessions[0]["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert "load average" in stored[2]["content"]
    assert stored[3]["content"].startswith("[this turn ended: error")
    second = admin.post(
        f"/api/v1/probes/{pid}/chat",
        json={"message": "And now?", "session_id": body["session_id"]},
    ).json()
    assert second["status"] == "completed", second
    assert "load average" in tool_results(llm.requests[-1])[0]  # the command's result, again
