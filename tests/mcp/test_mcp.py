"""The MCP server driven by the official ``mcp`` SDK client over streamable HTTP, with real
probes: authentication, per-tool permissions, the gate on run_command, approvals, resources."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.fleet.e2e.conftest import wait_for
from tests.support import LiveServer


def with_session(
    server: LiveServer, key: str, work: Callable[[ClientSession], Awaitable[Any]]
) -> Any:
    async def main() -> Any:
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
        async with (
            http,
            streamable_http_client(f"{server.url}/mcp", http_client=http) as streams,
            ClientSession(streams[0], streams[1]) as session,
        ):
            await session.initialize()
            return await work(session)

    return asyncio.run(main())


def payload(result: Any) -> Any:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        data = result.structured_content
        # Non-object results travel wrapped as {"result": …}.
        return data["result"] if isinstance(data, dict) and set(data) == {"result"} else data
    return json.loads(result.content[0].text)


def error_text(result: Any) -> str:
    assert result.is_error, result
    return " ".join(getattr(c, "text", "") for c in result.content)


def test_tools_resources_and_the_gate(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("mcp-a", tags="web", max_level="remediate", policy="full-remediate")
    pid = probe.probe_id
    victim = tmp_path / "x"
    victim.mkdir()

    async def work(session: ClientSession) -> dict[str, Any]:
        tools = {t.name for t in (await session.list_tools()).tools}
        out: dict[str, Any] = {"tools": tools}
        out["probes"] = payload(await session.call_tool("list_probes", {"tag": "web"}))
        out["info"] = payload(await session.call_tool("probe_info", {"probe_id": pid}))
        out["uptime"] = payload(
            await session.call_tool("run_command", {"probe_id": pid, "command": "uptime"})
        )
        out["rm"] = payload(
            await session.call_tool(
                "run_command",
                {"probe_id": pid, "command": f"rm -rf {victim}", "shell": True, "reason": "x"},
            )
        )
        out["pending"] = payload(await session.call_tool("list_approvals", {}))
        out["summary"] = payload(await session.call_tool("fleet_summary", {}))
        # The agent that asked cannot approve its own request: a person does (below).
        out["self_approved"] = await session.call_tool(
            "decide_approval",
            {"approval_id": out["rm"]["approval_id"], "decision": "approve"},
        )
        out["audit"] = payload(
            await session.call_tool("query_audit", {"action": "fleet.command.*", "limit": 10})
        )
        out["missing"] = await session.call_tool("probe_info", {"probe_id": "prb-nope0000"})
        inventory = await session.read_resource(f"legator://probes/{pid}/inventory")
        out["inventory"] = json.loads(inventory.contents[0].text)
        return out

    out = with_session(fleet_server, fleet_server.admin_key, work)
    assert {
        "list_probes",
        "probe_info",
        "run_command",
        "read_file",
        "fleet_summary",
        "list_approvals",
        "decide_approval",
        "query_audit",
    } <= out["tools"]
    assert [p["id"] for p in out["probes"]] == [pid]
    assert out["info"]["hostname"] == "mcp-a" and "score" in out["info"]["health"]
    assert out["uptime"]["status"] == "completed" and "load average" in out["uptime"]["stdout"]
    # rm -rf ends as a pending approval; nothing ran until it was approved.
    assert out["rm"]["status"] == "pending_approval"
    assert (
        out["rm"]["rationale"]["origin"] == "mcp" and out["rm"]["rationale"]["risk"] == "critical"
    )
    assert [a["id"] for a in out["pending"]] == [out["rm"]["approval_id"]]
    assert out["summary"]["approvals_pending"] == 1
    assert "cannot approve a request its own user made" in error_text(out["self_approved"])
    assert victim.exists()
    decided = admin.post(
        f"/api/v1/approvals/{out['rm']['approval_id']}/decide",
        json={"decision": "approve", "reason": "checked"},
    )
    assert decided.status_code == 200 and decided.json()["status"] == "dispatched"
    assert any(e["action"] == "fleet.command.dispatch" for e in out["audit"])
    assert "no probe" in error_text(out["missing"])
    assert "os" in out["inventory"]
    wait_for(lambda: not victim.exists())
    events = admin.get("/api/v1/audit", params={"action": "fleet.command.dispatch"}).json()
    assert len(events["events"]) == 2


def test_auth_and_per_tool_permissions(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("mcp-b")
    no_key = httpx.post(
        f"{fleet_server.url}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"accept": "application/json, text/event-stream"},
    )
    assert no_key.status_code == 401
    created = admin.post(
        "/api/v1/users",
        json={"username": "vera", "password": "correct horse battery", "role": "viewer"},
    )
    assert created.status_code == 201, created.text
    key = admin.post("/api/v1/keys", json={"name": "mcp", "user": "vera"}).json()["key"]

    async def work(session: ClientSession) -> tuple[Any, Any, Any]:
        probes = await session.call_tool("list_probes", {})
        run = await session.call_tool(
            "run_command", {"probe_id": probe.probe_id, "command": "uptime"}
        )
        decide = await session.call_tool(
            "decide_approval", {"approval_id": "x", "decision": "approve"}
        )
        return probes, run, decide

    probes, run, decide = with_session(fleet_server, key, work)
    assert [p["id"] for p in payload(probes)] == [probe.probe_id]
    assert "fleet:command" in error_text(run)
    assert "approvals:decide" in error_text(decide)


def test_run_command_waits_for_the_approval_and_its_result(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """With ``wait_for_approval_s`` the tool answers with the result once a human approves
    over REST; a rejection comes back as such, with nothing run; ``get_command`` reads a
    result later."""
    probe = spawn_probe("mcp-w", max_level="remediate", policy="full-remediate")
    pid = probe.probe_id
    victims = [tmp_path / "approved", tmp_path / "rejected"]
    for victim in victims:
        victim.mkdir()

    def decide(decision: str) -> None:
        pending = wait_for(
            lambda: admin.get("/api/v1/approvals", params={"status": "pending"}).json()
        )
        response = admin.post(
            f"/api/v1/approvals/{pending[0]['id']}/decide",
            json={"decision": decision, "reason": "checked"},
        )
        assert response.status_code == 200, response.text

    async def run(session: ClientSession, victim: Path, decision: str) -> Any:
        call = session.call_tool(
            "run_command",
            {
                "probe_id": pid,
                "command": f"rm -rf {victim} && echo gone",
                "shell": True,
                "wait_for_approval_s": 60,
            },
        )
        _, result = await asyncio.gather(asyncio.to_thread(decide, decision), call)
        return payload(result)

    async def work(session: ClientSession) -> dict[str, Any]:
        out = {"approved": await run(session, victims[0], "approve")}
        out["rejected"] = await run(session, victims[1], "deny")
        out["later"] = payload(
            await session.call_tool("get_command", {"request_id": out["approved"]["request_id"]})
        )
        out["too_long"] = await session.call_tool(
            "run_command", {"probe_id": pid, "command": "uptime", "wait_for_approval_s": 601}
        )
        return out

    out = with_session(fleet_server, fleet_server.admin_key, work)
    assert out["approved"]["status"] == "completed" and out["approved"]["stdout"] == "gone\n"
    assert not victims[0].exists()
    assert out["rejected"]["status"] == "denied" and out["rejected"]["reasons"] == ["checked"]
    assert victims[1].exists()
    assert out["later"] == {
        key: value for key, value in out["approved"].items() if key != "approval_id"
    }
    assert "wait_for_approval_s" in error_text(out["too_long"])


def test_an_agent_cannot_approve_what_another_agent_wrote(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Two MCP clients on two users' keys would otherwise wave each other's actions through,
    and no person would see them; a request a person wrote may still be decided over MCP."""
    pid = spawn_probe("mcp-d", max_level="remediate", policy="full-remediate").probe_id
    victim = tmp_path / "y"
    victim.mkdir()
    created = admin.post(
        "/api/v1/users",
        json={"username": "otto", "password": "correct horse battery", "role": "admin"},
    )
    assert created.status_code == 201, created.text
    other_key = admin.post("/api/v1/keys", json={"name": "mcp", "user": "otto"}).json()["key"]

    async def ask(session: ClientSession) -> Any:
        body = {"probe_id": pid, "command": f"rm -rf {victim}", "shell": True, "reason": "x"}
        return payload(await session.call_tool("run_command", body))

    asked = with_session(fleet_server, fleet_server.admin_key, ask)
    assert asked["status"] == "pending_approval"
    queued = admin.post(
        f"/api/v1/probes/{pid}/command", json={"command": "rm", "args": ["-rf", str(victim)]}
    )
    assert queued.status_code == 202, queued.text
    by_person = queued.json()

    async def approve_both(session: ClientSession) -> tuple[Any, Any]:
        agents = await session.call_tool(
            "decide_approval", {"approval_id": asked["approval_id"], "decision": "approve"}
        )
        persons = await session.call_tool(
            "decide_approval", {"approval_id": by_person["approval_id"], "decision": "deny"}
        )
        return agents, persons

    agents, persons = with_session(fleet_server, other_key, approve_both)
    assert "cannot approve a request a model wrote (origin mcp)" in error_text(agents)
    assert payload(persons)["status"] == "denied"
    still = admin.get(f"/api/v1/approvals/{asked['approval_id']}").json()
    assert still["status"] == "pending" and victim.exists()


def test_file_arguments_are_held_to_the_rest_limits(fleet_server: LiveServer, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    """REST takes paths of at most 4,096 characters; the tools passed any length on (and
    the refusal quoted the whole path back)."""
    pid = spawn_probe("mcp-f").probe_id

    async def work(session: ClientSession) -> Any:
        path = "/var/log/" + "a" * 70_000
        return await session.call_tool("read_file", {"probe_id": pid, "path": path})

    text = error_text(with_session(fleet_server, fleet_server.admin_key, work))
    assert "path: String should have at most 4096 characters" in text
    assert len(text) < 1000
