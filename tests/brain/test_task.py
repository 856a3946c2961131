"""The task runner against the scripted LLM (OpenAI and Anthropic wire formats) and real
probes: every command passes the gate, approvals hold the task, outages end it cleanly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.brain.helpers import Background, dispatches, pending_approval
from tests.brain.llm_server import ScriptedLLM, tool_results


def test_multi_step_task_waits_for_approval_then_completes(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("task-web", max_level="remediate", policy="full-remediate")
    pid = probe.probe_id
    marker = tmp_path / "restarts.log"
    llm.script = [
        {"text": "Checking health first.", "tools": [("get_health", {"probe": pid})]},
        {"tools": [("run_command", {"probe": pid, "command": "uptime", "reason": "load"})]},
        {
            "text": "The service looks stuck; restarting it.",
            "tools": [
                (
                    "run_command",
                    {
                        "probe": pid,
                        "command": f"echo restarted >> {marker}",
                        "shell": True,
                        "reason": "restart the stuck service",
                    },
                )
            ],
        },
        {"text": "Restarted; the host is healthy again."},
    ]
    task = Background(admin, f"/api/v1/probes/{pid}/task", {"goal": "fix the web service"})
    approval = pending_approval(admin)
    assert approval["targets"] == [pid] and approval["summary"].startswith("echo restarted")
    time.sleep(0.5)
    assert not marker.exists()  # nothing ran while pending
    decided = admin.post(f"/api/v1/approvals/{approval['id']}/decide", json={"decision": "approve"})
    assert decided.status_code == 200, decided.text
    response = task.result()
    assert response.status_code == 200, response.text
    transcript = response.json()
    assert transcript["status"] == "completed", transcript
    assert transcript["answer"] == "Restarted; the host is healthy again."
    steps = transcript["steps"]
    assert [s["tools"][0]["name"] for s in steps[:3]] == [
        "get_health",
        "run_command",
        "run_command",
    ]
    assert steps[1]["tools"][0]["decision"] == "allow"
    assert steps[1]["tools"][0]["result"]["status"] == "completed"
    restart = steps[2]["tools"][0]
    assert restart["decision"] == "queue"
    assert restart["approval"]["id"] == approval["id"]
    assert restart["approval"]["status"] == "dispatched"
    assert restart["result"]["exit_code"] == 0
    assert marker.read_text() == "restarted\n"  # exactly once
    assert len(dispatches(admin)) == 2  # uptime + the approved restart
    # The model saw the health, the uptime output and the restart result, in order.
    shown = tool_results(llm.requests[-1])
    assert len(shown) == 3 and '"score"' in shown[0] and "load average" in shown[1]
    assert json.loads(shown[2])["status"] == "completed"
    steps_audited = admin.get("/api/v1/audit", params={"action": "brain.task.step"}).json()
    assert len(steps_audited["events"]) == 4


def test_task_rm_rf_ends_as_pending_approval_and_a_denial_reaches_the_model(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("task-deny", max_level="remediate", policy="full-remediate")
    victim = tmp_path / "x"
    victim.mkdir()
    llm.script = [
        {
            "tools": [
                (
                    "run_command",
                    {
                        "probe": probe.probe_id,
                        "command": f"rm -rf {victim}",
                        "shell": True,
                        "reason": "clean up",
                    },
                )
            ]
        },
        {"text": "The clean-up was denied; nothing was removed."},
    ]
    task = Background(admin, f"/api/v1/probes/{probe.probe_id}/task", {"goal": "free disk"})
    approval = pending_approval(admin)
    assert approval["risk"] == "critical" and approval["status"] == "pending"
    admin.post(
        f"/api/v1/approvals/{approval['id']}/decide",
        json={"decision": "deny", "reason": "not during business hours"},
    )
    transcript = task.result().json()
    assert transcript["status"] == "completed"
    call = transcript["steps"][0]["tools"][0]
    assert call["decision"] == "queue" and call["approval"]["status"] == "denied"
    assert "denied" in tool_results(llm.requests[-1])[0]
    assert "not during business hours" in tool_results(llm.requests[-1])[0]
    assert victim.exists() and dispatches(admin) == []


def test_policy_refusal_is_told_to_the_model(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("task-observe")  # observe-only policy: remediation is refused
    llm.script = [
        {
            "tools": [
                (
                    "run_command",
                    {"probe": probe.probe_id, "command": "reboot", "reason": "try a reboot"},
                )
            ]
        },
        {"text": "I may not reboot this host."},
    ]
    response = admin.post(f"/api/v1/probes/{probe.probe_id}/task", json={"goal": "reboot"})
    transcript = response.json()
    assert transcript["status"] == "completed"
    assert transcript["steps"][0]["tools"][0]["decision"] == "deny"
    assert tool_results(llm.requests[-1])[0].startswith("refused by policy")
    assert dispatches(admin) == []


def test_provider_outage_mid_task_is_a_clear_error_and_nothing_runs_twice(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("task-outage", max_level="remediate", policy="unattended")
    marker = tmp_path / "ran.log"
    llm.script = [
        {
            "tools": [
                (
                    "run_command",
                    {
                        "probe": probe.probe_id,
                        "command": f"echo ran >> {marker}",
                        "shell": True,
                        "reason": "step one",
                    },
                )
            ]
        },
        {"status": 503, "message": "upstream overloaded"},
    ]  # every later request fails too: the script is empty
    response = admin.post(f"/api/v1/probes/{probe.probe_id}/task", json={"goal": "do it"})
    assert response.status_code == 200, response.text
    transcript = response.json()
    assert transcript["status"] == "error"
    assert "provider failed" in transcript["error"]
    assert len(transcript["steps"]) == 1
    time.sleep(0.5)
    assert marker.read_text() == "ran\n"
    assert len(dispatches(admin)) == 1
    finished = admin.get("/api/v1/audit", params={"action": "brain.task.finished"}).json()
    assert finished["events"][0]["details"]["status"] == "error"


def test_step_limit_ends_the_task(admin: httpx.Client, spawn_probe, llm: ScriptedLLM) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("task-loop")
    llm.script = [{"tools": [("get_health", {"probe": probe.probe_id})]}] * 3
    response = admin.post(
        f"/api/v1/probes/{probe.probe_id}/task", json={"goal": "loop", "max_steps": 2}
    )
    transcript = response.json()
    assert transcript["status"] == "step_limit" and len(transcript["steps"]) == 2
    assert len(llm.requests) == 2


def test_undecided_approval_is_cancelled_when_the_task_times_out(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("task-timeout", max_level="remediate", policy="full-remediate")
    victim = tmp_path / "x"
    victim.mkdir()
    command = {"probe": probe.probe_id, "command": "rm", "args": ["-rf", str(victim)]}
    llm.script = [{"tools": [("run_command", {**command, "reason": "clean"})]}]
    response = admin.post(
        f"/api/v1/probes/{probe.probe_id}/task", json={"goal": "clean", "timeout_s": 2}
    )
    transcript = response.json()
    assert transcript["status"] == "time_limit", transcript
    call = transcript["steps"][0]["tools"][0]
    assert call["approval"]["status"] == "cancelled"
    approval = admin.get(f"/api/v1/approvals/{call['approval']['id']}").json()
    assert approval["status"] == "cancelled"
    # Approving it now is refused: it can never run behind the finished task's back.
    late = admin.post(
        f"/api/v1/approvals/{call['approval']['id']}/decide", json={"decision": "approve"}
    )
    assert late.status_code == 409
    assert victim.exists() and dispatches(admin) == []
