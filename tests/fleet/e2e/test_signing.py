"""A hostile or broken control plane: the probe's signature checks and local ceiling."""

from __future__ import annotations

import json

import httpx

from legator.fleet.protocol import CommandSpec, new_envelope, sign, signed
from tests.fleet.e2e.conftest import unattended_policy, wait_for
from tests.fleet.e2e.helpers import probe_key, record_command, send_raw, set_probe
from tests.support import LiveServer


def _final(admin: httpx.Client, request_id: str) -> dict:  # type: ignore[type-arg]
    return wait_for(
        lambda: (
            (c := admin.get(f"/api/v1/commands/{request_id}").json())["status"]
            not in ("dispatched", "running")
            and c
        )
    )


def _spec(request_id: str, command: str = "uname", level: str = "observe") -> CommandSpec:
    return CommandSpec(request_id=request_id, command=command, level=level)  # type: ignore[arg-type]


def test_tampered_unsigned_stale_and_foreign_key_are_rejected(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("sig-a")
    key = probe_key(fleet_server, probe.probe_id)

    rid = record_command(fleet_server, probe.probe_id, "uname")
    tampered = signed("command", _spec(rid), key)
    tampered = tampered.model_copy(update={"payload": {**tampered.payload, "command": "id"}})
    send_raw(fleet_server, probe.probe_id, tampered)
    final = _final(admin, rid)
    assert final["status"] == "rejected" and "invalid signature" in final["error"]

    rid = record_command(fleet_server, probe.probe_id, "uname")
    send_raw(fleet_server, probe.probe_id, new_envelope("command", _spec(rid)))
    final = _final(admin, rid)
    assert final["status"] == "rejected" and "unsigned" in final["error"]

    rid = record_command(fleet_server, probe.probe_id, "uname")
    old = new_envelope("command", _spec(rid)).model_copy(update={"ts": "2020-01-01T00:00:00Z"})
    send_raw(fleet_server, probe.probe_id, sign(old, key))
    final = _final(admin, rid)
    assert final["status"] == "rejected" and "clock" in final["error"]

    rid = record_command(fleet_server, probe.probe_id, "uname")
    send_raw(fleet_server, probe.probe_id, signed("command", _spec(rid), "ab" * 32))
    assert _final(admin, rid)["status"] == "rejected"


def test_replayed_envelope_is_refused_and_cannot_rewrite_a_result(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("sig-b")
    key = probe_key(fleet_server, probe.probe_id)
    rid = record_command(fleet_server, probe.probe_id, "uname")
    envelope = signed("command", _spec(rid), key)
    send_raw(fleet_server, probe.probe_id, envelope)
    first = _final(admin, rid)
    assert first["status"] == "completed"
    send_raw(fleet_server, probe.probe_id, envelope)
    audit = wait_for(
        lambda: admin.get(
            "/api/v1/audit", params={"action": "fleet.command.refused_by_probe"}
        ).json()["events"]
    )
    assert audit[0]["details"]["reason"] == "replayed"
    assert admin.get(f"/api/v1/commands/{rid}").json()["status"] == "completed"


def test_policy_refusal_at_each_end(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("sig-c", max_level="diagnose")
    # 1. the control plane refuses before sending (default policy observe-only)
    refused = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?wait=true",
        json={"command": "journalctl", "args": ["-n", "1"]},
    )
    assert refused.status_code == 403
    message = refused.json()["error"]["message"]
    assert "observe-only" in message and "diagnose" in message
    # 2. the probe reported a local ceiling of diagnose; a remediate policy cannot lift it
    unattended = unattended_policy(admin)
    applied = admin.post(f"/api/v1/probes/{probe.probe_id}/apply-policy/{unattended}").json()
    assert applied["detail"]["effective_level"] == "diagnose"
    assert (
        admin.post(
            f"/api/v1/probes/{probe.probe_id}/command?wait=true",
            json={"command": "touch", "args": ["/tmp/legator-should-not-exist"]},
        ).status_code
        == 403
    )
    # 3. a control plane that believes otherwise sends it, signed with a valid key:
    #    the probe refuses on its own.
    set_probe(fleet_server, probe.probe_id, max_level="remediate")
    over = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?wait=true",
        json={"command": "touch", "args": ["/tmp/legator-should-not-exist"]},
    )
    assert over.status_code == 200, over.text
    body = over.json()
    assert body["status"] == "refused" and "refused by the probe" in body["error"]
    import os

    assert not os.path.exists("/tmp/legator-should-not-exist")
    # and directly over the hub, with a level that lies about the command
    rid = record_command(fleet_server, probe.probe_id, "touch")
    spec = CommandSpec(request_id=rid, command="touch", args=["/tmp/legator-x"], level="observe")
    send_raw(
        fleet_server,
        probe.probe_id,
        signed("command", spec, probe_key(fleet_server, probe.probe_id)),
    )
    assert _final(admin, rid)["status"] == "refused"
    assert not os.path.exists("/tmp/legator-x")
    # a read-only program whose environment makes it run something (LESSOPEN): the probe
    # classifies the environment it is given too
    marker = "/tmp/legator-env-should-not-exist"
    rid = record_command(fleet_server, probe.probe_id, "less")
    spec = CommandSpec(
        request_id=rid,
        command="less",
        args=["/etc/hostname"],
        env={"LESSOPEN": f"|touch {marker} %s"},
        level="observe",
    )
    send_raw(
        fleet_server,
        probe.probe_id,
        signed("command", spec, probe_key(fleet_server, probe.probe_id)),
    )
    assert _final(admin, rid)["status"] == "refused"
    assert not os.path.exists(marker)
    audit = admin.get(
        "/api/v1/audit", params={"action": "gate.decision", "outcome": "denied"}
    ).json()["events"]
    assert audit and audit[0]["details"]["decision"] == "deny"
    assert "observe-only" in json.dumps(audit[-1]["details"]["denied"])
