"""Fleet operations: tags and fan-out, policies, files, key rotation, update, delete, cleanup,
restart of the control plane."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as sync_connect

from legator import __version__
from legator.fleet.protocol import Ack, CommandSpec, Envelope, Verifier, new_envelope, signed
from tests.fleet.e2e.conftest import wait_for
from tests.fleet.e2e.helpers import probe_key, record_command, send_raw
from tests.support import LiveServer, run_cli


def test_tags_views_and_fan_out(admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    a = spawn_probe("fan-a", tags="web")
    b = spawn_probe("fan-b", tags="web,db")
    c = spawn_probe("fan-c", tags="db")
    assert admin.get("/api/v1/fleet/tags").json() == {"db": 2, "web": 2}
    by_tag = {p["id"] for p in admin.get("/api/v1/fleet/by-tag/web").json()}
    assert by_tag == {a.probe_id, b.probe_id}
    updated = admin.put(f"/api/v1/probes/{c.probe_id}/tags", json={"tags": ["web", "db"]})
    assert updated.status_code == 200 and updated.json()["tags"] == ["db", "web"]
    assert admin.put(f"/api/v1/probes/{c.probe_id}/tags", json={"tags": ["a b"]}).status_code == 422
    fan = admin.post("/api/v1/fleet/by-tag/web/command", json={"command": "hostname"}).json()
    assert fan["targets"] == 3
    assert {r["probe_id"] for r in fan["results"]} == {a.probe_id, b.probe_id, c.probe_id}
    assert all(r["ok"] and r["result"]["status"] == "completed" for r in fan["results"])
    refused = admin.post("/api/v1/fleet/by-tag/db/command", json={"command": "journalctl"}).json()
    assert refused["targets"] == 2 and not any(r["ok"] for r in refused["results"])
    assert "observe-only" in refused["results"][0]["error"]
    assert (
        admin.post("/api/v1/fleet/by-tag/none/command", json={"command": "id"}).status_code == 404
    )
    listing = admin.get("/api/v1/probes", params={"tag": "db"}).json()
    assert {p["id"] for p in listing} == {b.probe_id, c.probe_id}
    assert admin.get("/api/v1/probes", params={"q": "fan-a"}).json()[0]["id"] == a.probe_id
    summary = admin.get("/api/v1/fleet/summary").json()
    assert summary["total"] == 3 and summary["connected"] == 3
    inventory = admin.get("/api/v1/fleet/inventory").json()
    assert {row["probe_id"] for row in inventory} == {a.probe_id, b.probe_id, c.probe_id}
    metrics = admin.get("/metrics").text
    assert "legator_fleet_connected_sockets 3.0" in metrics
    assert 'legator_fleet_commands_total{outcome="completed"}' in metrics
    assert "legator_fleet_command_duration_seconds_count" in metrics


def test_policy_crud_apply_and_files(admin: httpx.Client, spawn_probe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "app.log").write_text(
        "".join(f"line {i} {'ERROR' if i % 3 == 0 else 'ok'}\n" for i in range(1, 11))
    )
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    (allowed / "escape").symlink_to(secret)
    builtins = {p["id"] for p in admin.get("/api/v1/policies").json()}
    assert {"observe-only", "diagnose", "full-remediate"} <= builtins
    body = {
        "name": "web-diag",
        "level": "diagnose",
        "block": ["journalctl -k"],
        "paths": [str(allowed)],
    }
    created = admin.post("/api/v1/policies", json=body)
    assert created.status_code == 201, created.text
    policy = created.json()
    assert admin.post("/api/v1/policies", json=body).status_code == 409
    assert (
        admin.post("/api/v1/policies", json={**body, "name": "x", "paths": ["rel"]}).status_code
        == 422
    )
    assert admin.put("/api/v1/policies/diagnose", json=body).status_code == 400
    probe = spawn_probe("pol-a", policy=policy["id"])
    applied = admin.post(f"/api/v1/probes/{probe.probe_id}/apply-policy/{policy['id']}").json()
    assert (
        applied["ok"]
        and applied["detail"]["delivered"]
        and applied["detail"]["effective_level"] == "diagnose"
    )
    blocked = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?wait=true",
        json={"command": "journalctl", "args": ["-k"]},
    )
    assert blocked.status_code == 403 and "blocked" in blocked.json()["error"]["message"]
    assert admin.delete(f"/api/v1/policies/{policy['id']}").status_code == 409  # in use

    files = f"/api/v1/probes/{probe.probe_id}/files"
    read = admin.get(files, params={"op": "read", "path": str(allowed / "app.log")}).json()
    assert read["result"]["content"].startswith("line 1 ok")
    lines = admin.get(
        files, params={"op": "readlines", "path": str(allowed / "app.log"), "start": 2, "end": 3}
    ).json()
    assert lines["result"]["lines"] == ["line 2 ok", "line 3 ERROR"]
    search = admin.get(
        files, params={"op": "search", "path": str(allowed / "app.log"), "pattern": "ERROR"}
    ).json()
    assert [m["line"] for m in search["result"]["matches"]] == [3, 6, 9]
    info = admin.get(files, params={"op": "stat", "path": str(allowed)}).json()
    assert info["result"]["type"] == "dir"
    outside = admin.get(files, params={"op": "read", "path": str(secret)})
    assert outside.status_code == 403 and "does not allow" in outside.json()["error"]["message"]
    dotdot = admin.get(files, params={"op": "read", "path": f"{allowed}/../secret.txt"})
    assert dotdot.status_code == 403
    link = admin.get(files, params={"op": "read", "path": str(allowed / "escape")})
    assert (
        link.status_code == 400 and "outside the allowed paths" in link.json()["error"]["message"]
    )
    assert "top secret" not in link.text

    # back to a built-in, then the custom policy can go
    admin.post(f"/api/v1/probes/{probe.probe_id}/apply-policy/observe-only")
    assert admin.delete(f"/api/v1/policies/{policy['id']}").status_code == 204
    assert admin.get(f"/api/v1/policies/{policy['id']}").status_code == 404


def test_probe_never_serves_its_own_credentials(  # type: ignore[no-untyped-def]
    admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:
    """Even under a policy that allows its directory (as the built-in ``diagnose`` allows
    ``/etc`` and ``/proc``), the probe refuses its probe.yaml, however the path reaches it,
    and any process's environment."""
    probe = spawn_probe("creds", start=False)
    config = probe.config_dir / "probe.yaml"
    (probe.config_dir / "notes.txt").write_text("harmless\n")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link").symlink_to(config)
    os.link(config, allowed / "hard")
    created = admin.post(
        "/api/v1/policies",
        json={"name": "diag-wide", "level": "diagnose", "paths": [str(tmp_path), "/proc"]},
    )
    assert created.status_code == 201, created.text
    applied = admin.post(f"/api/v1/probes/{probe.probe_id}/apply-policy/{created.json()['id']}")
    assert applied.status_code == 200, applied.text
    probe.start()
    wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
    assert probe.proc is not None
    files = f"/api/v1/probes/{probe.probe_id}/files"

    def read(path: str, op: str = "read") -> httpx.Response:
        return admin.get(files, params={"op": op, "path": path, "pattern": "key"})

    ok = wait_for(lambda: (r := read(str(probe.config_dir / "notes.txt"))).status_code == 200 and r)
    assert ok.json()["result"]["content"] == "harmless\n"  # the policy reaches the directory
    for path in (
        str(config),
        str(allowed / "link"),
        f"{allowed}/../{probe.config_dir.name}/probe.yaml",
        str(allowed / "hard"),
    ):
        for op in ("read", "search"):
            refused = read(path, op)
            assert refused.status_code == 400, (path, op, refused.text)
            message = refused.json()["error"]["message"]
            assert "own credentials file" in message, message
            assert "signing_key" not in refused.text and "lpk_" not in refused.text
    for path in (
        "/proc/self/environ",
        "/proc/thread-self/environ",
        f"/proc/{probe.proc.pid}/environ",
        f"/proc/{os.getpid()}/environ",
        "/proc/self/mem",
    ):
        refused = read(path)
        assert refused.status_code == 400, (path, refused.text)
        assert "environment or memory" in refused.json()["error"]["message"]
    assert read("/proc/self/status").status_code == 200


def _ws_status(server: LiveServer, key: str) -> int:
    async def go() -> int:
        url = server.url.replace("http", "ws") + "/ws/probe"
        try:
            async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    return asyncio.run(go())


def test_rotate_key(fleet_server: LiveServer, admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("rot-a")
    path = probe.config_dir / "probe.yaml"
    old = yaml.safe_load(path.read_text())
    old_key = old["api_key"]
    rotated = admin.post(f"/api/v1/probes/{probe.probe_id}/rotate-key")
    assert rotated.status_code == 200 and rotated.json()["ok"], rotated.text
    new = yaml.safe_load(path.read_text())
    new_key = new["api_key"]
    assert new_key != old_key
    assert _ws_status(fleet_server, old_key) == 401
    # The signing key rotates with it, on the live connection: the control plane's commands
    # still run, and one signed with the old key (from a copied probe.yaml) is refused.
    assert new["signing_key"] != old["signing_key"]
    assert rotated.json()["detail"]["signing_key_rotated"] is True
    assert new["signing_key"] == probe_key(fleet_server, probe.probe_id)
    ran = admin.post(f"/api/v1/probes/{probe.probe_id}/command?wait=true", json={"command": "id"})
    assert ran.status_code == 200 and ran.json()["status"] == "completed", ran.text
    rid = record_command(fleet_server, probe.probe_id, "id")
    spec = CommandSpec(request_id=rid, command="id")
    send_raw(fleet_server, probe.probe_id, signed("command", spec, old["signing_key"]))
    forged = wait_for(
        lambda: (c := admin.get(f"/api/v1/commands/{rid}").json())["status"] != "dispatched" and c
    )
    assert forged["status"] == "rejected" and "invalid signature" in forged["error"]
    audit = admin.get("/api/v1/audit", params={"action": "fleet.probe.rotate_key"}).json()
    assert audit["events"][0]["details"] == {"signing_rotated": True}
    probe.stop()
    probe.start()
    wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
    result = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?wait=true", json={"command": "id"}
    ).json()
    assert result["status"] == "completed"


def test_rotate_key_of_a_probe_that_predates_signing_key_rotation(
    fleet_server: LiveServer, admin: httpx.Client
) -> None:
    """A probe that ignores the new signing key (an older release) acknowledges the new probe
    key only: it keeps its signing key, and the control plane keeps signing with it."""
    token = admin.post("/api/v1/tokens").json()["token"]
    enrolled = httpx.post(
        fleet_server.url + "/api/v1/register", json={"token": token, "hostname": "rot-old"}
    ).json()
    probe_id = enrolled["probe_id"]
    url = fleet_server.url.replace("http", "ws") + "/ws/probe"
    headers = {"Authorization": f"Bearer {enrolled['api_key']}"}
    with (
        sync_connect(url, additional_headers=headers) as ws,
        ThreadPoolExecutor(1) as pool,
    ):
        wait_for(lambda: admin.get(f"/api/v1/probes/{probe_id}").json()["connected"])
        rotating = pool.submit(admin.post, f"/api/v1/probes/{probe_id}/rotate-key")
        envelope = Envelope.model_validate_json(ws.recv(timeout=10))
        assert envelope.type == "rotate_key"
        Verifier(enrolled["signing_key"]).verify(envelope)
        ack = Ack(ref=envelope.id, type=envelope.type)  # no word of a signing key
        ws.send(new_envelope("ack", ack).model_dump_json())
        rotated = rotating.result(timeout=30)
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["detail"]["signing_key_rotated"] is False
        assert "re-enrol" in rotated.json()["detail"]["note"]
        assert probe_key(fleet_server, probe_id) == enrolled["signing_key"]
        # The connection still signs with the key the probe holds.
        pinging = pool.submit(admin.post, f"/api/v1/probes/{probe_id}/apply-policy/observe-only")
        push = Envelope.model_validate_json(ws.recv(timeout=10))
        Verifier(enrolled["signing_key"]).verify(push)
        ws.send(new_envelope("ack", Ack(ref=push.id, type=push.type)).model_dump_json())
        assert pinging.result(timeout=30).status_code == 200
    assert _ws_status(fleet_server, enrolled["api_key"]) == 401
    audit = admin.get("/api/v1/audit", params={"action": "fleet.probe.rotate_key"}).json()
    assert audit["events"][0]["details"] == {"signing_rotated": False}


def test_update_with_a_bad_checksum_is_refused(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("upd-a", max_level="remediate")  # where updates are on by default
    url = f"{fleet_server.url}/download/legator-probe-{__version__}.pyz"
    data = httpx.get(url).content
    assert data[:2] == b"#!"
    bad = admin.post(
        f"/api/v1/probes/{probe.probe_id}/update",
        json={"url": url, "version": __version__, "sha256": "0" * 64},
    )
    assert bad.status_code == 400 and "checksum mismatch" in bad.json()["error"]["message"]
    good_sum = hashlib.sha256(data).hexdigest()
    # the test probe runs from the installed package, not a zipapp: it says so and stays up
    other = admin.post(
        f"/api/v1/probes/{probe.probe_id}/update",
        json={"url": url, "version": __version__, "sha256": good_sum},
    )
    assert other.status_code == 400 and "zipapp" in other.json()["error"]["message"]
    assert admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"]
    audit = admin.get("/api/v1/audit", params={"action": "fleet.probe.update"}).json()["events"]
    assert audit[0]["outcome"] == "failure"


def test_updates_are_off_below_remediate_unless_the_host_allows_them(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    """An update runs whatever code it brings: a probe whose local maximum is diagnose would
    otherwise run anything its control plane sends, past the ceiling no message may raise."""
    probe = spawn_probe("upd-off")
    url = f"{fleet_server.url}/download/legator-probe-{__version__}.pyz"
    body = {"url": url, "version": __version__, "sha256": "0" * 64}
    refused = admin.post(f"/api/v1/probes/{probe.probe_id}/update", json=body)
    assert refused.status_code == 400
    assert "updates are off on this probe (local maximum diagnose)" in refused.text
    assert "allow_updates: true" in refused.text
    status = run_cli("legator-probe", "status", "--json", "--config-dir", str(probe.config_dir))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["updates_allowed"] is False


def test_delete_and_cleanup(fleet_server: LiveServer, admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    keep = spawn_probe("del-a")
    gone = spawn_probe("del-b")
    assert admin.delete(f"/api/v1/probes/{keep.probe_id}").status_code == 204
    assert admin.get(f"/api/v1/probes/{keep.probe_id}").status_code == 404
    assert admin.delete(f"/api/v1/probes/{keep.probe_id}").status_code == 404
    gone.stop()
    wait_for(
        lambda: admin.get(f"/api/v1/probes/{gone.probe_id}").json()["status"] == "offline",
        timeout=15,
    )
    assert admin.post("/api/v1/fleet/cleanup", params={"older_than": "1h"}).json()["removed"] == []
    assert admin.post("/api/v1/fleet/cleanup", params={"older_than": "soon"}).status_code == 400
    removed = admin.post("/api/v1/fleet/cleanup", params={"older_than": "1s"}).json()["removed"]
    assert removed == [gone.probe_id]


def test_reconnect_after_control_plane_restart(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("rs-a")
    fleet_server.restart()
    with fleet_server.client(admin.headers["authorization"].split()[1]) as client:
        wait_for(
            lambda: client.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"], timeout=30
        )
        result = client.post(
            f"/api/v1/probes/{probe.probe_id}/command?wait=true", json={"command": "uname"}
        ).json()
        assert result["status"] == "completed"


def test_viewer_cannot_command(admin: httpx.Client, spawn_probe, fleet_server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("rbac-a")
    admin.post(
        "/api/v1/users",
        json={"username": "vi", "password": "correct horse battery", "role": "viewer"},
    )
    key = admin.post("/api/v1/keys", json={"name": "t", "user": "vi"}).json()["key"]
    with fleet_server.client(key) as viewer:
        assert viewer.get("/api/v1/probes").status_code == 200
        assert (
            viewer.post(
                f"/api/v1/probes/{probe.probe_id}/command", json={"command": "id"}
            ).status_code
            == 403
        )
        assert viewer.post("/api/v1/tokens").status_code == 403
    assert os.path.exists(probe.config_dir / "probe.yaml")
