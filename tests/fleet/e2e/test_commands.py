# ruff: noqa: S604  (shell=True is a field of the API request here)
"""Commands through the real hub to real probes: modes, streaming, limits, timeouts, loss."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import httpx

from tests.fleet.e2e.conftest import UNATTENDED, ProbeProcess, unattended_policy, wait_for
from tests.support import LiveServer


def _run(admin: httpx.Client, probe: ProbeProcess, query: str = "wait=true", **body):  # type: ignore[no-untyped-def]
    return admin.post(f"/api/v1/probes/{probe.probe_id}/command?{query}", json=body)


def test_wait_fire_and_forget_and_pending(admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("cmd-a")
    done = _run(admin, probe, command="uname", args=["-s"])
    assert done.status_code == 200, done.text
    result = done.json()
    assert result["status"] == "completed" and result["exit_code"] == 0
    assert result["stdout"] == "Linux\n" and result["truncated"] is False
    assert uuid.UUID(result["request_id"]).version == 4 and result["duration_ms"] >= 0
    failed = _run(admin, probe, command="ls", args=["/definitely/not/here"]).json()
    assert (
        failed["status"] == "failed"
        and failed["exit_code"] != 0
        and "No such file" in failed["stderr"]
    )
    missing = _run(admin, probe, command="no-such-program-xyz").json()
    # unknown programs are remediate, so the control plane refuses before sending
    assert "error" in missing
    fired = _run(admin, probe, query="", command="sleep", args=["1.5"])
    assert fired.status_code == 200 and fired.json()["status"] == "dispatched"
    request_id = fired.json()["request_id"]
    pending = admin.get("/api/v1/commands/pending").json()
    assert request_id in [c["request_id"] for c in pending]
    final = wait_for(
        lambda: (
            (c := admin.get(f"/api/v1/commands/{request_id}").json())["status"] == "completed" and c
        )
    )
    assert final["exit_code"] == 0 and final["finished_at"]
    assert admin.get(f"/api/v1/commands/{uuid.uuid4()}").status_code == 404
    assert _run(admin, probe, query="wait=true&stream=true", command="ls").status_code == 400


def test_commands_do_not_inherit_the_probes_legator_variables(  # type: ignore[no-untyped-def]
    admin: httpx.Client, spawn_probe
) -> None:
    probe = spawn_probe("cmd-env", start=False)
    probe.start(
        LEGATOR_TOKEN="prb_" + "a1" * 24,
        LEGATOR_SERVER_URL="https://cp.example",
        LEGATOR_SECRET_THING="s3cret",
        PROBE_HOST_VAR="kept",
    )
    wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
    # A harmless variable: any other makes the command remediate (LESSOPEN, LD_PRELOAD…).
    done = _run(admin, probe, command="printenv", env={"TZ": "Europe/Paris"})
    assert done.status_code == 200, done.text
    result = done.json()
    assert result["status"] == "completed", result
    lines = result["stdout"].splitlines()
    assert not [line for line in lines if line.upper().startswith("LEGATOR_")], lines
    assert "s3cret" not in result["stdout"] and "prb_" not in result["stdout"]
    assert "TZ=Europe/Paris" in lines  # the command's own env still reaches it
    assert "PROBE_HOST_VAR=kept" in lines  # and the rest of the probe's environment


def test_commands_run_concurrently_on_the_probe(  # type: ignore[no-untyped-def]
    admin: httpx.Client, spawn_probe, tmp_path
) -> None:
    # A rendezvous, not a stopwatch: each command marks that it started, then waits up to 10 s
    # for all four marks. Run one after another, the first gives up and fails; a stalled
    # dispatch on a loaded machine changes nothing.
    probe = spawn_probe("cmd-b", max_level="remediate", policy=UNATTENDED)
    marks = tmp_path / "marks"
    marks.mkdir()
    script = (
        f"touch {marks}/{{}}; n=0; "
        f'while [ "$(ls {marks} | wc -l)" -lt 4 ] && [ "$n" -lt 200 ]; '
        "do sleep 0.05; n=$((n+1)); done; "
        f'[ "$(ls {marks} | wc -l)" -ge 4 ]'
    )
    ids = [
        _run(admin, probe, query="", command=script.format(i), shell=True).json()["request_id"]
        for i in range(4)
    ]
    results = [
        wait_for(
            lambda rid=request_id: (
                (c := admin.get(f"/api/v1/commands/{rid}").json())["status"]
                in ("completed", "failed")
                and c
            ),
            timeout=30,
        )
        for request_id in ids
    ]
    assert [r["exit_code"] for r in results] == [0, 0, 0, 0], results


def test_shell_only_when_asked_and_output_cap(admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("cmd-c")
    argv = _run(admin, probe, command="echo", args=["a;", "b", "$(id)"]).json()
    assert argv["stdout"] == "a; b $(id)\n"  # no shell: nothing was interpreted
    shell = _run(admin, probe, command="echo one | tr a-z A-Z", shell=True).json()
    assert shell["stdout"] == "ONE\n"
    big = _run(admin, probe, command="yes | head -c 3000000", shell=True).json()
    assert big["status"] == "completed" and big["truncated"] is True
    assert len(big["stdout"]) == 1024 * 1024


def test_timeout_kills_the_whole_process_group(admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("cmd-d")
    marker = "61.4321"
    result = _run(
        admin,
        probe,
        command=f"sleep {marker} & sleep {marker}; echo never",
        shell=True,
        timeout_s=1,
    ).json()
    assert result["status"] == "timeout" and "timeout" in result["error"]
    time.sleep(0.5)
    survivors = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert survivors.stdout.strip() == "", "a child of the timed-out command survived"


def test_stream_with_replay(admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("cmd-e", max_level="remediate")
    loop = "for i in 1 2 3; do echo line$i; sleep 0.3; done; echo oops >&2"
    refused = _run(admin, probe, query="stream=true", command=loop, shell=True)
    # a for loop is no known program: remediate, above the default observe-only policy
    assert refused.status_code == 403 and "observe-only" in refused.json()["error"]["message"]
    unattended = unattended_policy(admin)
    assert admin.post(f"/api/v1/probes/{probe.probe_id}/apply-policy/{unattended}").json()["ok"]
    started = _run(admin, probe, query="stream=true", command=loop, shell=True)
    assert started.status_code == 200, started.text
    url = started.json()["stream_url"]
    events = _sse(admin, url)
    chunks = [e for e in events if e["event"] in ("stdout", "stderr")]
    text = "".join(json.loads(c["data"])["data"] for c in chunks if c["event"] == "stdout")
    assert text == "line1\nline2\nline3\n" and len(chunks) >= 3
    assert any(c["event"] == "stderr" for c in chunks)
    assert events[-1]["event"] == "result"
    assert json.loads(events[-1]["data"])["status"] == "completed"
    replay = _sse(admin, url, last_event_id=chunks[0]["id"])
    replayed = [e for e in replay if e["event"] in ("stdout", "stderr")]
    assert [e["id"] for e in replayed] == [e["id"] for e in chunks][1:]
    assert replay[-1]["event"] == "result"


def _sse(admin: httpx.Client, url: str, last_event_id: str | None = None) -> list[dict[str, str]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, str]] = []
    with admin.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            current[key] = value
    return events


def test_probe_lost_mid_command(admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("cmd-f")
    request_id = _run(admin, probe, query="", command="sleep", args=["20"], timeout_s=1).json()[
        "request_id"
    ]
    assert probe.proc is not None
    probe.proc.kill()
    probe.proc.wait()
    final = wait_for(
        lambda: (c := admin.get(f"/api/v1/commands/{request_id}").json())["status"] == "lost" and c,
        timeout=20,
    )
    assert "timeout" in final["error"]


def test_result_delivered_after_reconnect(
    admin: httpx.Client, spawn_probe, fleet_server: LiveServer
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("cmd-g")
    request_id = _run(admin, probe, query="", command="sleep", args=["2"], timeout_s=30).json()[
        "request_id"
    ]
    time.sleep(0.3)
    fleet_server.restart()
    final = wait_for(
        lambda: (
            (
                c := httpx.get(
                    f"{fleet_server.url}/api/v1/commands/{request_id}", headers=admin.headers
                ).json()
            )["status"]
            == "completed"
            and c
        ),
        timeout=30,
    )
    assert final["exit_code"] == 0


def test_decision_and_dispatch_are_audited_with_their_request(  # type: ignore[no-untyped-def]
    admin: httpx.Client, spawn_probe
) -> None:
    """The gate's decision and the dispatch are written together, each command's events
    under the id of the request that made it."""
    probe = spawn_probe("cmd-audit")
    request_ids = []
    for _ in range(3):
        done = _run(admin, probe, command="uname")
        assert done.status_code == 200, done.text
        request_ids.append(done.headers["x-request-id"])
    for action in ("gate.decision", "fleet.command.dispatch"):
        page = admin.get("/api/v1/audit", params={"action": action, "limit": 3}).json()
        events = page["events"]
        assert sorted(e["request_id"] for e in events) == sorted(request_ids), action
    offline = admin.post("/api/v1/probes/prb-00000000/command?wait=true", json={"command": "uname"})
    assert offline.status_code == 404
