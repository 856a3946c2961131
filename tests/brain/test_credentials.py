"""A conversation holds only while its credential does, and what it starts ends with it.

Chat sockets and tasks outlive the moment they were authenticated: the credential is checked
again before each message and each tool call, while the socket idles and at its expiry; a
credential that fails gets an error and the close code 1008, and runs nothing more. An approval
a conversation waits on is cancelled when the conversation ends first (the client went away, the
server shut down). Chat shows the model fleet data, so it needs ``fleet:read`` as well as
``fleet:command``. Real control plane, real probes, the scripted LLM on both wire formats."""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from legator.brain.tools import Toolbox
from legator.core.auth.models import ApiKey
from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.db.base import utcnow
from tests.brain.helpers import Background, dispatches, pending_approval
from tests.brain.llm_server import ScriptedLLM, tool_results
from tests.fleet.e2e.conftest import UNATTENDED, wait_for
from tests.support import LiveServer

PASSWORD = "Correct-Horse-9!x"


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://") + "/ws/chat"


def operator(admin: httpx.Client, name: str, scopes: list[str] | None = None) -> dict[str, Any]:
    """A new operator and an API key of theirs (``key``, ``id``)."""
    created = admin.post(
        "/api/v1/users", json={"username": name, "password": PASSWORD, "role": "operator"}
    )
    assert created.status_code == 201, created.text
    key = admin.post("/api/v1/keys", json={"user": name, "name": "k", "scopes": scopes or ["*"]})
    assert key.status_code == 201, key.text
    return key.json()  # type: ignore[no-any-return]


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


def exchange(socket: ClientConnection, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Send one message; every event up to ``done`` or ``error``."""
    socket.send(json.dumps(body))
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in ("done", "error"):
        events.append(json.loads(socket.recv(timeout=60)))
    return events


def close_code(socket: ClientConnection, timeout: float = 30) -> int | None:
    """Read until the server closes the socket; the close code it sent."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as closed:
        while time.monotonic() < deadline:
            socket.recv(timeout=max(0.1, deadline - time.monotonic()))
    return closed.value.rcvd.code if closed.value.rcvd else None


def command(pid: str, program: str, *args: str) -> dict[str, Any]:
    """A model turn that asks to run ``program args`` on the probe."""
    call = {"probe": pid, "command": program, "args": list(args), "reason": "asked"}
    return {"tools": [("run_command", call)]}


def touch(pid: str, marker: Path) -> dict[str, Any]:
    return command(pid, "touch", str(marker))


def rm_rf(pid: str, victim: Path) -> dict[str, Any]:
    return command(pid, "rm", "-rf", str(victim))


def actors(admin: httpx.Client) -> list[str]:
    return [event["actor"] for event in dispatches(admin)]


def cancellations(admin: httpx.Client) -> list[dict[str, Any]]:
    found = admin.get("/api/v1/audit", params={"action": "approval.cancel"}).json()
    return list(found["events"])


# ---- 1. the credential is checked again ----------------------------------------------------


def test_a_key_revoked_while_its_socket_is_open_runs_nothing_more(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_probe("cred-rev", max_level="remediate", policy=UNATTENDED).probe_id
    key = operator(admin, "mallory")
    first, second = tmp_path / "first", tmp_path / "after-revocation"
    llm.script = [touch(pid, first), {"text": "done"}, touch(pid, second), {"text": "done"}]
    with connect(ws_url(fleet_server), additional_headers=bearer(key), open_timeout=10) as ws:
        assert exchange(ws, {"probe": pid, "message": "touch it"})[-1]["type"] == "done"
        assert first.exists()
        # The operator leaves: key revoked, then the account disabled and deleted.
        assert admin.delete(f"/api/v1/keys/{key['id']}").status_code == 200
        assert admin.patch("/api/v1/users/mallory", json={"disabled": True}).status_code == 200
        assert admin.delete("/api/v1/users/mallory").status_code == 204
        events = exchange(ws, {"probe": pid, "message": "touch it again"})
        assert events[-1]["type"] == "error" and events[-1]["code"] == "unauthorized", events
        assert "revoked" in events[-1]["message"]
        assert close_code(ws) == 1008
    assert not second.exists()
    assert actors(admin) == ["mallory"]  # the first command only
    assert len(llm.requests) == 2  # nor did the model hear of the second message


def test_a_disabled_users_session_socket_is_closed(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_probe("cred-sess", max_level="remediate", policy=UNATTENDED).probe_id
    operator(admin, "oscar")
    with fleet_server.client() as browser:
        signed_in = browser.post(
            "/api/v1/auth/login", json={"username": "oscar", "password": PASSWORD}
        )
        assert signed_in.status_code == 200, signed_in.text
        cookie = f"legator_session={browser.cookies['legator_session']}"
    headers = {"Cookie": cookie, "Origin": fleet_server.url}
    marker = tmp_path / "after-disable"
    llm.script = [touch(pid, marker), {"text": "done"}]
    with connect(ws_url(fleet_server), additional_headers=headers, open_timeout=10) as ws:
        assert admin.patch("/api/v1/users/oscar", json={"disabled": True}).status_code == 200
        events = exchange(ws, {"probe": pid, "message": "touch it"})
        assert events[-1]["type"] == "error" and events[-1]["code"] == "unauthorized", events
        assert close_code(ws) == 1008
    assert not marker.exists() and dispatches(admin) == [] and llm.requests == []


def test_a_key_revoked_mid_conversation_runs_no_further_tool(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # The message passed the check; the key is revoked while the model thinks: the command
    # it then asks for is checked against the credential as it is now.
    pid = spawn_probe("cred-mid", max_level="remediate", policy=UNATTENDED).probe_id
    key = operator(admin, "mallory")
    marker = tmp_path / "mid"

    def revoke_then_touch(_: dict[str, Any]) -> dict[str, Any]:
        assert admin.delete(f"/api/v1/keys/{key['id']}").status_code == 200
        return touch(pid, marker)

    llm.script = [revoke_then_touch, {"text": "done"}]
    with connect(ws_url(fleet_server), additional_headers=bearer(key), open_timeout=10) as ws:
        events = exchange(ws, {"probe": pid, "message": "touch it"})
        assert events[-1]["type"] == "error" and events[-1]["code"] == "unauthorized", events
        assert close_code(ws) == 1008
    assert not marker.exists() and dispatches(admin) == [] and len(llm.requests) == 1


def test_a_task_whose_key_is_revoked_runs_no_further_tool(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # The REST task (and chat) lives as long as its steps and approvals: the same check.
    pid = spawn_probe("cred-task", max_level="remediate", policy=UNATTENDED).probe_id
    key = operator(admin, "mallory")
    marker = tmp_path / "task"

    def revoke_then_touch(_: dict[str, Any]) -> dict[str, Any]:
        assert admin.delete(f"/api/v1/keys/{key['id']}").status_code == 200
        return touch(pid, marker)

    llm.script = [{"tools": [("get_health", {"probe": pid})]}, revoke_then_touch, {"text": "ok"}]
    with fleet_server.client(key["key"]) as client:
        response = client.post(f"/api/v1/probes/{pid}/task", json={"goal": "touch it"})
    assert response.status_code == 401, response.text
    assert not marker.exists() and dispatches(admin) == [] and len(llm.requests) == 2
    # The two model turns it took are billed to the profile all the same.
    usage = {row["feature"]: row for row in admin.get("/api/v1/brain/usage").json()}["task"]
    assert usage["requests"] >= 1 and usage["input_tokens"] >= 2 * 11, usage
    finished = admin.get("/api/v1/audit", params={"action": "brain.task.finished"}).json()
    assert [e["details"]["status"] for e in finished["events"]] == ["unauthorized"]


@pytest.mark.parametrize("provider", ["openai"])
def test_an_idle_socket_is_closed_once_its_key_is_revoked(
    fleet_server: LiveServer, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("legator.brain.router.RECHECK_S", 0.5, raising=False)
    key = operator(admin, "mallory")
    with connect(ws_url(fleet_server), additional_headers=bearer(key), open_timeout=10) as ws:
        assert admin.delete(f"/api/v1/keys/{key['id']}").status_code == 200
        error = json.loads(ws.recv(timeout=10))  # nothing sent: the periodic check
        assert error["type"] == "error" and error["code"] == "unauthorized"
        assert close_code(ws) == 1008


@pytest.mark.parametrize("provider", ["openai"])
def test_a_socket_ends_when_its_key_expires(
    fleet_server: LiveServer, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The next periodic check far away: only the expiry itself can end the socket in time.
    monkeypatch.setattr("legator.brain.router.RECHECK_S", 60.0)
    key = operator(admin, "mallory")

    async def expire_soon() -> None:  # the API counts in days; the database does not
        async with fleet_server.core.db.write() as session:  # type: ignore[union-attr]
            await session.execute(
                update(ApiKey)
                .where(ApiKey.id == key["id"])
                .values(expires_at=utcnow() + timedelta(seconds=3))
            )

    fleet_server.call(expire_soon())
    with connect(ws_url(fleet_server), additional_headers=bearer(key), open_timeout=10) as ws:
        started = time.monotonic()
        error = json.loads(ws.recv(timeout=15))
        assert error["type"] == "error" and "expired" in error["message"], error
        assert close_code(ws) == 1008
        assert time.monotonic() - started < 12  # at the expiry (3 s), not the check at 60 s


# ---- 2. an approval does not outlive its conversation ----------------------------------------


def test_a_socket_that_goes_away_cancels_its_pending_approval(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_probe("orphan", max_level="remediate", policy="full-remediate").probe_id
    victim = tmp_path / "victim"
    victim.mkdir()
    llm.script = [rm_rf(pid, victim), {"text": "ok"}]
    headers = {"Authorization": f"Bearer {fleet_server.admin_key}"}
    with connect(ws_url(fleet_server), additional_headers=headers, open_timeout=10) as ws:
        ws.send(json.dumps({"probe": pid, "message": "clean up"}))
        while (event := json.loads(ws.recv(timeout=60)))["type"] != "tool":
            pass
        assert event["event"] == "approval_pending"
        approval_id = event["data"]["approval"]["id"]
    # Gone, well before LEGATOR_BRAIN_APPROVAL_WAIT_S (900 s): nobody waits for it any more.
    approval = wait_for(
        lambda: (
            (a := admin.get(f"/api/v1/approvals/{approval_id}").json())["status"] != "pending" and a
        ),
        timeout=15,
    )
    assert approval["status"] == "cancelled"
    assert [c["details"]["reason"] for c in cancellations(admin)] == [
        "the conversation ended before a decision"
    ]
    late = admin.post(f"/api/v1/approvals/{approval_id}/decide", json={"decision": "approve"})
    assert late.status_code == 409, late.text
    time.sleep(1)
    assert victim.exists() and dispatches(admin) == []


def post_and_hang_up(server: LiveServer, path: str, body: dict[str, Any]) -> socket.socket:
    """A POST sent on a raw connection, left unanswered until the caller closes it."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: legator\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {server.admin_key}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    connection.sendall(head.encode() + data)
    return connection


@pytest.mark.parametrize("provider", ["openai"])
@pytest.mark.parametrize("kind", ["task", "chat"])
def test_a_rest_conversation_whose_client_goes_away_ends_and_cancels_its_approval(
    fleet_server: LiveServer,
    admin: httpx.Client,
    spawn_probe,  # type: ignore[no-untyped-def]
    llm: ScriptedLLM,
    tmp_path: Path,
    kind: str,
) -> None:
    pid = spawn_probe(f"rest-gone-{kind}", max_level="remediate", policy="full-remediate").probe_id
    victim = tmp_path / "victim"
    victim.mkdir()
    llm.script = [rm_rf(pid, victim), {"text": "ok"}]
    body = {"goal": "clean up"} if kind == "task" else {"message": "clean up"}
    connection = post_and_hang_up(fleet_server, f"/api/v1/probes/{pid}/{kind}", body)
    approval = pending_approval(admin)
    connection.close()
    # Gone, well before LEGATOR_BRAIN_APPROVAL_WAIT_S (900 s): nobody waits for it any more.
    wait_for(
        lambda: admin.get(f"/api/v1/approvals/{approval['id']}").json()["status"] == "cancelled",
        timeout=15,
    )
    action = "brain.task.finished" if kind == "task" else "brain.probe_chat"
    ended = wait_for(
        lambda: admin.get("/api/v1/audit", params={"action": action}).json()["events"],
        timeout=15,
    )
    assert [e["details"]["status"] for e in ended] == ["cancelled"]
    # The model turn it took is billed all the same.
    feature = "task" if kind == "task" else "probe_chat"
    usage = {row["feature"]: row for row in admin.get("/api/v1/brain/usage").json()}
    assert usage[feature]["input_tokens"] > 0, usage
    assert victim.exists() and dispatches(admin) == [] and len(llm.requests) == 1


def test_a_socket_closed_at_once_leaves_no_pending_approval(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # The client sends and leaves: the conversation ends where it notices (its first event
    # cannot be sent), and the approval it made, if it made one, is cancelled.
    pid = spawn_probe("orphan-now", max_level="remediate", policy="full-remediate").probe_id
    victim = tmp_path / "victim"
    victim.mkdir()
    llm.script = [rm_rf(pid, victim), {"text": "ok"}]
    headers = {"Authorization": f"Bearer {fleet_server.admin_key}"}
    with connect(ws_url(fleet_server), additional_headers=headers, open_timeout=10) as ws:
        ws.send(json.dumps({"probe": pid, "message": "clean up"}))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not admin.get("/api/v1/approvals").json():
        time.sleep(0.1)
    wait_for(
        lambda: all(a["status"] != "pending" for a in admin.get("/api/v1/approvals").json()),
        timeout=10,
    )
    assert victim.exists() and dispatches(admin) == []


@pytest.mark.parametrize("provider", ["openai"])
def test_stopping_the_server_cancels_the_approval_a_socket_waits_on(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_probe("shut-ws", max_level="remediate", policy="full-remediate").probe_id
    victim = tmp_path / "victim"
    victim.mkdir()
    llm.script = [rm_rf(pid, victim), {"text": "ok"}]
    headers = {"Authorization": f"Bearer {fleet_server.admin_key}"}
    with connect(ws_url(fleet_server), additional_headers=headers, open_timeout=10) as ws:
        ws.send(json.dumps({"probe": pid, "message": "clean up"}))
        while json.loads(ws.recv(timeout=60))["type"] != "tool":
            pass
        fleet_server.stop()  # closes the socket: its conversation ends, and the approval
    fleet_server.start()
    assert [a["status"] for a in admin.get("/api/v1/approvals").json()] == ["cancelled"]
    assert victim.exists() and dispatches(admin) == []


@pytest.mark.parametrize("provider", ["openai"])
def test_the_shutdown_hook_cancels_what_a_rest_chat_waits_on(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Under `legator serve`, a REST chat still waiting at shutdown is cancelled after the
    # graceful period; the brain's shutdown hook cancels whatever approval is left.
    pid = spawn_probe("shut-rest", max_level="remediate", policy="full-remediate").probe_id
    victim = tmp_path / "victim"
    victim.mkdir()
    llm.script = [rm_rf(pid, victim), {"text": "It was cancelled."}]
    chat = Background(admin, f"/api/v1/probes/{pid}/chat", {"message": "clean up"})
    approval = pending_approval(admin)
    brain = fleet_server.app.state.brain  # type: ignore[union-attr]
    assert brain.aclose in fleet_server.core.shutdown_hooks  # type: ignore[union-attr]

    def shut_down() -> bool:  # again until the chat holds the approval it made
        fleet_server.call(brain.aclose())
        return admin.get(f"/api/v1/approvals/{approval['id']}").json()["status"] != "pending"

    wait_for(shut_down, timeout=10)
    body = chat.result().json()
    assert body["steps"][0]["tools"][0]["approval"]["status"] == "cancelled", body
    reasons = [c["details"]["reason"] for c in cancellations(admin)]
    assert reasons == ["the server shut down before a decision"]
    assert victim.exists() and dispatches(admin) == []


# ---- 3. chat shows fleet data: it needs fleet:read ------------------------------------------


@pytest.mark.parametrize("provider", ["openai"])
def test_a_command_only_key_cannot_read_the_fleet_through_chat(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM
) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_probe("cred-scope").probe_id
    narrow = operator(admin, "carol", ["fleet:command"])
    with fleet_server.client(narrow["key"]) as client:
        assert client.get(f"/api/v1/probes/{pid}").status_code == 403  # as over REST
        for path, body in [
            (f"/api/v1/probes/{pid}/chat", {"message": "inventory?"}),
            (f"/api/v1/probes/{pid}/task", {"goal": "inventory?"}),
            ("/api/v1/fleet/chat", {"message": "which hosts?"}),
        ]:
            response = client.post(path, json=body)
            assert response.status_code == 403, response.text
            assert "fleet:read" in response.json()["error"]["message"]
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(fleet_server), additional_headers=bearer(narrow), open_timeout=10)
    assert refused.value.response.status_code == 403
    assert llm.requests == []  # the model saw nothing of the fleet
    # With fleet:read as well, the same chat works and reads the inventory.
    both = admin.post(
        "/api/v1/keys",
        json={"user": "carol", "name": "both", "scopes": ["fleet:command", "fleet:read"]},
    ).json()
    llm.script = [{"tools": [("get_inventory", {"probe": pid})]}, {"text": "Linux."}]
    with fleet_server.client(both["key"]) as client:
        response = client.post(f"/api/v1/probes/{pid}/chat", json={"message": "inventory?"})
    assert response.status_code == 200, response.text
    assert "not permitted" not in tool_results(llm.requests[-1])[0]


async def test_the_read_tools_need_fleet_read() -> None:
    command_only = Principal(
        user_id="u",
        username="carol",
        role="operator",
        permissions=frozenset({Permission.FLEET_COMMAND}),
        method="api_key",
    )
    toolbox = Toolbox(
        SimpleNamespace(fleet=None, approvals=None),
        command_only,
        origin="chat",
        approval_wait_s=1,
        output_chars=1000,
        allowed_probes={"prb-1"},
        fleet_tags=True,
    )
    for name, arguments in [
        ("get_inventory", {"probe": "prb-1"}),
        ("get_health", {"probe": "prb-1"}),
        ("list_probes", {}),
        ("get_command_result", {"request_id": "r"}),
    ]:
        outcome = await toolbox.call(name, arguments)
        assert outcome.content.startswith("error: not permitted"), (name, outcome.content)
        assert "fleet:read" in outcome.content
