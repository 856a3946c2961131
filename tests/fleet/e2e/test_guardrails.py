"""The gate on the real command paths, with real probes: REST and fan-out wait for approval,
an approved command runs exactly once, pending approvals survive a restart, and nothing in
the code sends a command around the gate."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import httpx

from tests.fleet.e2e.conftest import wait_for
from tests.support import LiveServer

SRC = Path(__file__).resolve().parents[3] / "src" / "legator"


def _victim(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    target.mkdir()
    (target / "file").write_text("x")
    return target


def test_rest_command_waits_for_approval_then_runs_once(
    admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("gate-a", max_level="remediate", policy="full-remediate")
    victim = _victim(tmp_path, "victim")
    response = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command",
        json={"command": f"rm -rf {victim}", "shell": True},
    )
    assert response.status_code == 202, response.text
    assert response.headers["x-legator-policy-decision"] == "queue"
    assert response.headers["x-legator-risk-tier"] == "critical"
    body = response.json()
    assert body["status"] == "pending_approval"
    rationale = body["rationale"]
    assert rationale["level"] == "remediate" and rationale["mode"] == "mutation_gate"
    assert rationale["policies"] == {probe.probe_id: "full-remediate"}
    time.sleep(0.5)
    assert victim.exists()  # nothing ran
    assert admin.get("/api/v1/fleet/summary").json()["approvals_pending"] == 1
    decided = admin.post(
        f"/api/v1/approvals/{body['approval_id']}/decide", json={"decision": "approve"}
    ).json()
    assert decided["status"] == "dispatched"
    request_id = decided["result"]["request_ids"][probe.probe_id]
    final = wait_for(
        lambda: (
            (c := admin.get(f"/api/v1/commands/{request_id}").json())["status"] == "completed" and c
        )
    )
    assert final["exit_code"] == 0 and not victim.exists()
    commands = admin.get("/api/v1/audit", params={"action": "fleet.command.dispatch"}).json()
    assert len(commands["events"]) == 1


def test_allowed_command_carries_the_decision_headers(admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("gate-b")
    response = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?wait=true", json={"command": "uptime"}
    )
    assert response.status_code == 200
    assert response.headers["x-legator-policy-decision"] == "allow"
    assert response.headers["x-legator-risk-tier"] == "low"
    denied = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command", json={"command": "rm", "args": ["-rf", "/x"]}
    )
    assert denied.status_code == 403
    assert denied.headers["x-legator-policy-decision"] == "deny"
    assert denied.json()["error"]["details"]["risk"] == "critical"


def test_fan_out_queues_one_approval_for_the_group(
    admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probes = [
        spawn_probe(f"gate-f{i}", tags="edge", max_level="remediate", policy="full-remediate")
        for i in range(2)
    ]
    marker = tmp_path / "touched"
    response = admin.post(
        "/api/v1/fleet/by-tag/edge/command",
        json={"command": "sh", "args": ["-c", f"echo hi >> {marker}"]},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["decision"] == "queue" and body["results"] == []
    approvals = admin.get("/api/v1/approvals", params={"status": "pending"}).json()
    assert len(approvals) == 1
    assert sorted(approvals[0]["targets"]) == sorted(p.probe_id for p in probes)
    decided = admin.post(
        f"/api/v1/approvals/{body['approval_id']}/decide", json={"decision": "approve"}
    ).json()
    assert set(decided["result"]["request_ids"]) == {p.probe_id for p in probes}
    wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) == 2)
    time.sleep(0.5)
    assert len(marker.read_text().splitlines()) == 2  # once per probe, not more


def test_pending_approvals_survive_a_restart(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("gate-r", max_level="remediate", policy="full-remediate")
    victims = [_victim(tmp_path, f"v{i}") for i in range(3)]
    ids = []
    for victim in victims:
        queued = admin.post(
            f"/api/v1/probes/{probe.probe_id}/command",
            json={"command": "rm", "args": ["-rf", str(victim)]},
        )
        assert queued.status_code == 202
        ids.append(queued.json()["approval_id"])
    fleet_server.restart()
    with fleet_server.client(fleet_server.admin_key) as again:
        pending = again.get("/api/v1/approvals", params={"status": "pending"}).json()
        assert sorted(a["id"] for a in pending) == sorted(ids)
        wait_for(lambda: again.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
        decided = again.post(f"/api/v1/approvals/{ids[1]}/decide", json={"decision": "approve"})
        assert decided.json()["status"] == "dispatched"
        wait_for(lambda: not victims[1].exists())
        assert victims[0].exists() and victims[2].exists()
        dispatches = again.get("/api/v1/audit", params={"action": "fleet.command.dispatch"}).json()[
            "events"
        ]
        assert len(dispatches) == 1


def _sends_commands(node: ast.AST) -> bool:
    """A call to the low-level executor, or the hub sending a command envelope."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return False
    if node.func.attr == "_record_and_send":
        return True
    return node.func.attr == "send" and any(
        isinstance(arg, ast.Name) and arg.id == "T_COMMAND" for arg in node.args
    )


def test_no_dispatch_path_skips_the_gate() -> None:
    """Every place that sends a command is inside CommandService, in ``run`` and
    ``fan_out`` (after the gate), ``_run_approved`` (after an approval) or ``_record_and_send``
    itself. A new caller anywhere else fails this test."""
    allowed = {
        ("fleet/commands/service.py", "run"),
        ("fleet/commands/service.py", "fan_out"),
        ("fleet/commands/service.py", "one"),  # fan_out's per-target helper
        ("fleet/commands/service.py", "_run_approved"),
        ("fleet/commands/service.py", "_record_and_send"),
    }
    found = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if _sends_commands(node):
                    found.add((str(path.relative_to(SRC)), function.name))
    assert found, "the scan found no dispatch site at all: it is looking at the wrong code"
    outside = {site for site in found if site not in allowed}
    assert not outside, f"commands sent around the gate: {sorted(outside)}"
