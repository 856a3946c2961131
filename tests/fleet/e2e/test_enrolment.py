"""Enrolment and connection with real probe processes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import stat
import threading
from pathlib import Path

import httpx
import pytest
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from legator.core.security import sha256_hex
from legator.fleet.protocol import CommandSpec, derive_probe_key, signed
from legator.fleet.schemas import RegisterRequest
from tests.fleet.e2e.conftest import ProbeProcess, wait_for
from tests.fleet.e2e.helpers import fleet, probe_key, record_command, send_raw, set_probe
from tests.support import LiveServer


def _register(server: LiveServer, token: str, hostname: str) -> httpx.Response:
    return httpx.post(
        server.url + "/api/v1/register",
        json={"token": token, "hostname": hostname, "os": "linux", "arch": "x86_64"},
    )


def test_token_shape_reuse_and_hashing(fleet_server: LiveServer, admin: httpx.Client) -> None:
    created = admin.post("/api/v1/tokens")
    assert created.status_code == 201
    body = created.json()
    assert body["token"].startswith("prb_") and body["multi_use"] is False
    assert body["expires_at"] is not None
    assert fleet_server.url in body["install_command"] and body["token"] in body["install_command"]
    first = _register(fleet_server, body["token"], "alpha")
    assert first.status_code == 201, first.text
    answer = first.json()
    assert answer["probe_id"].startswith("prb-") and len(answer["probe_id"]) == 12
    salt = fleet_server.call(fleet(fleet_server).registry.key_salt(answer["probe_id"]))
    assert len(salt) == 32  # this enrolment's
    assert answer["signing_key"] == derive_probe_key(
        fleet_server.core.signing_key, answer["probe_id"], salt
    )
    again = _register(fleet_server, body["token"], "beta")
    assert again.status_code == 401 and "token" in again.json()["error"]["message"]
    db_file = b"".join(p.read_bytes() for p in fleet_server.data_dir.glob("legator.db*"))
    assert body["token"].encode() not in db_file and answer["api_key"].encode() not in db_file
    assert sha256_hex(answer["api_key"]).encode() in db_file
    listed = admin.get("/api/v1/tokens").json()
    assert listed[0]["used_count"] == 1 and "token" not in listed[0]
    assert admin.delete(f"/api/v1/tokens/{listed[0]['id']}").status_code == 204
    assert admin.delete(f"/api/v1/tokens/{listed[0]['id']}").status_code == 404


def test_expired_and_multi_use_tokens(fleet_server: LiveServer, admin: httpx.Client) -> None:
    multi = admin.post("/api/v1/tokens?multi_use=true&no_expiry=true").json()
    assert multi["expires_at"] is None and multi["multi_use"] is True
    assert _register(fleet_server, multi["token"], "m1").status_code == 201
    assert _register(fleet_server, multi["token"], "m2").status_code == 201
    short = admin.post("/api/v1/tokens").json()
    from datetime import timedelta

    from sqlalchemy import update

    from legator.core.db import utcnow
    from legator.fleet.models import EnrolmentToken

    async def expire() -> None:
        async with fleet_server.core.db.write() as session:
            await session.execute(
                update(EnrolmentToken)
                .where(EnrolmentToken.id == short["id"])
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )

    fleet_server.call(expire())
    assert _register(fleet_server, short["token"], "late").status_code == 401


def test_concurrent_registration_single_use_token_has_one_winner(
    fleet_server: LiveServer, admin: httpx.Client
) -> None:
    token = admin.post("/api/v1/tokens").json()["token"]
    results: list[int] = []
    barrier = threading.Barrier(6)

    def go(i: int) -> None:
        barrier.wait()
        results.append(_register(fleet_server, token, f"racer-{i}").status_code)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [201, 401, 401, 401, 401, 401]


async def _socket_status(server: LiveServer, key: str) -> int:
    ws_url = server.url.replace("http", "ws") + "/ws/probe"
    try:
        async with connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def _token_uses(admin: httpx.Client, token_id: str) -> int:
    return next(t["used_count"] for t in admin.get("/api/v1/tokens").json() if t["id"] == token_id)


def test_a_token_cannot_take_over_an_enrolled_hostname(
    fleet_server: LiveServer, admin: httpx.Client
) -> None:
    multi = admin.post("/api/v1/tokens?multi_use=true").json()
    first = _register(fleet_server, multi["token"], "gamma").json()
    refused = _register(fleet_server, multi["token"], "gamma")
    assert refused.status_code == 409
    message = refused.json()["error"]["message"]
    assert "'gamma' is already enrolled" in message and "--probe" in message
    single = admin.post("/api/v1/tokens").json()
    assert _register(fleet_server, single["token"], "gamma").status_code == 409
    # A refused registration loses nothing: the token is still unused, the probe's key works.
    assert _token_uses(admin, single["id"]) == 0
    assert _register(fleet_server, single["token"], "gamma-2").status_code == 201
    assert asyncio.run(_socket_status(fleet_server, first["api_key"])) == 101


def test_re_enrolment_token_keeps_the_id_and_ends_the_old_key(
    fleet_server: LiveServer, admin: httpx.Client
) -> None:
    token = admin.post("/api/v1/tokens").json()["token"]
    first = _register(fleet_server, token, "epsilon").json()
    probe_id = first["probe_id"]
    admin.put(f"/api/v1/probes/{probe_id}/tags", json={"tags": ["db"]})

    async def reenrol_while_connected() -> tuple[dict, int | None]:  # type: ignore[type-arg]
        ws_url = fleet_server.url.replace("http", "ws") + "/ws/probe"
        headers = {"Authorization": f"Bearer {first['api_key']}"}
        async with connect(ws_url, additional_headers=headers) as old:
            for _ in range(100):
                probe = await asyncio.to_thread(admin.get, f"/api/v1/probes/{probe_id}")
                if probe.json()["connected"]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the probe's socket never counted as connected")
            bound = admin.post(f"/api/v1/tokens?probe_id={probe_id}").json()
            assert bound["probe_id"] == probe_id and bound["multi_use"] is False
            assert bound["expires_at"] is not None
            answer = await asyncio.to_thread(_register, fleet_server, bound["token"], "epsilon")
            assert answer.status_code == 201, answer.text
            await old.wait_closed()
            return answer.json(), old.close_code

    second, close_code = asyncio.run(reenrol_while_connected())
    assert close_code == 4401
    assert second["probe_id"] == probe_id and second["api_key"] != first["api_key"]
    assert second["signing_key"] != first["signing_key"]
    assert second["signing_key"] == probe_key(fleet_server, probe_id)
    assert asyncio.run(_socket_status(fleet_server, first["api_key"])) == 401
    assert asyncio.run(_socket_status(fleet_server, "lpk_" + "0" * 64)) == 401
    assert asyncio.run(_socket_status(fleet_server, second["api_key"])) == 101
    probe = admin.get(f"/api/v1/probes/{probe_id}").json()
    assert probe["tags"] == ["db"]
    audit = admin.get("/api/v1/audit", params={"action": "fleet.probe.register"}).json()
    assert any(e["target"] == probe_id and e["details"]["new"] is False for e in audit["events"])


def _final(admin: httpx.Client, request_id: str) -> dict:  # type: ignore[type-arg]
    return wait_for(
        lambda: (
            (c := admin.get(f"/api/v1/commands/{request_id}").json())["status"]
            not in ("dispatched", "running")
            and c
        )
    )


def test_re_enrolment_gives_the_probe_a_new_signing_key(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    """Whoever copied the old probe.yaml (why an operator re-enrols) keeps nothing that works:
    neither its probe key nor its signing key, which verified every command before."""
    probe: ProbeProcess = spawn_probe("iota")
    path = probe.config_dir / "probe.yaml"
    stolen = yaml.safe_load(path.read_text())
    probe.stop()
    bound = admin.post(f"/api/v1/tokens?probe_id={probe.probe_id}").json()["token"]
    done = probe.init(bound, hostname="iota")
    assert done.returncode == 0, done.stderr
    fresh = yaml.safe_load(path.read_text())
    assert fresh["probe_id"] == stolen["probe_id"] == probe.probe_id
    assert fresh["api_key"] != stolen["api_key"]
    assert fresh["signing_key"] != stolen["signing_key"]
    assert fresh["signing_key"] == probe_key(fleet_server, probe.probe_id)
    probe.start()
    wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
    # The control plane signs with the new key: its commands run.
    ran = admin.post(f"/api/v1/probes/{probe.probe_id}/command?wait=true", json={"command": "id"})
    assert ran.status_code == 200 and ran.json()["status"] == "completed", ran.text
    # A command signed with the stolen key (a forged control plane) is refused by the probe.
    rid = record_command(fleet_server, probe.probe_id, "id")
    spec = CommandSpec(request_id=rid, command="id")
    send_raw(fleet_server, probe.probe_id, signed("command", spec, stolen["signing_key"]))
    forged = _final(admin, rid)
    assert forged["status"] == "rejected" and "invalid signature" in forged["error"]
    # And the stolen probe key opens no socket.
    assert asyncio.run(_socket_status(fleet_server, stolen["api_key"])) == 401


def test_a_socket_authenticated_just_before_a_re_enrolment_is_closed(
    fleet_server: LiveServer, admin: httpx.Client
) -> None:
    """The old probe key passed the check, then the probe was re-enrolled before its socket
    was attached: that socket must not live on, signing with the old enrolment's key."""
    token = admin.post("/api/v1/tokens").json()["token"]
    first = _register(fleet_server, token, "lambda").json()
    bound = admin.post(f"/api/v1/tokens?probe_id={first['probe_id']}").json()["token"]
    registry = fleet(fleet_server).registry
    authenticate = registry.authenticate

    async def re_enrolled_meanwhile(raw_key: str):  # type: ignore[no-untyped-def]
        probe = await authenticate(raw_key)
        if raw_key == first["api_key"]:
            await registry.register(RegisterRequest(token=bound, hostname="lambda"))
        return probe

    async def connect_with_the_old_key() -> tuple[int | None, str | None]:
        ws_url = fleet_server.url.replace("http", "ws") + "/ws/probe"
        headers = {"Authorization": f"Bearer {first['api_key']}"}
        async with connect(ws_url, additional_headers=headers) as old:
            await asyncio.wait_for(old.wait_closed(), 10)
            return old.close_code, old.close_reason

    registry.authenticate = re_enrolled_meanwhile  # type: ignore[method-assign]
    try:
        code, reason = asyncio.run(connect_with_the_old_key())
    finally:
        del registry.authenticate
    assert (code, reason) == (4401, "probe re-enrolled")
    assert first["probe_id"] not in fleet(fleet_server).hub.connections


def test_a_probe_enrolled_before_key_salts_keeps_its_signing_key(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    """An upgrade leaves a probe enrolled earlier with the empty salt (the migration's
    default): its probe.yaml holds the key of the old derivation, which still works."""
    probe: ProbeProcess = spawn_probe("mu", start=False)
    path = probe.config_dir / "probe.yaml"
    legacy = hmac.new(
        fleet_server.core.signing_key,
        f"legator-probe-signing|{probe.probe_id}".encode(),
        hashlib.sha256,
    ).hexdigest()
    set_probe(fleet_server, probe.probe_id, key_salt="")
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "signing_key": legacy}))
    assert probe_key(fleet_server, probe.probe_id) == legacy
    probe.start()
    wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
    ran = admin.post(f"/api/v1/probes/{probe.probe_id}/command?wait=true", json={"command": "id"})
    assert ran.status_code == 200 and ran.json()["status"] == "completed", ran.text


def test_re_enrolment_token_is_for_its_probe_only(
    fleet_server: LiveServer, admin: httpx.Client
) -> None:
    multi = admin.post("/api/v1/tokens?multi_use=true").json()["token"]
    zeta = _register(fleet_server, multi, "zeta").json()["probe_id"]
    _register(fleet_server, multi, "eta")
    bound = admin.post(f"/api/v1/tokens?probe_id={zeta}").json()
    # Not for another probe's hostname; the refusal leaves it unused.
    taken = _register(fleet_server, bound["token"], "eta")
    assert taken.status_code == 409 and zeta in taken.json()["error"]["message"]
    assert _token_uses(admin, bound["id"]) == 0
    # A reinstalled host may come back under a new name; the token is then spent.
    renamed = _register(fleet_server, bound["token"], "zeta-new")
    assert renamed.status_code == 201 and renamed.json()["probe_id"] == zeta
    assert admin.get(f"/api/v1/probes/{zeta}").json()["hostname"] == "zeta-new"
    assert _register(fleet_server, bound["token"], "zeta-new").status_code == 401
    # Deleting the probe deletes the tokens made for it.
    unused = admin.post(f"/api/v1/tokens?probe_id={zeta}").json()
    assert admin.delete(f"/api/v1/probes/{zeta}").status_code == 204
    assert unused["id"] not in {t["id"] for t in admin.get("/api/v1/tokens").json()}
    assert _register(fleet_server, unused["token"], "zeta-new").status_code == 401


@pytest.mark.parametrize(
    ("query", "status", "fragment"),
    [
        ("probe_id=prb-00000000", 404, "no probe with id prb-00000000"),
        ("probe_id={probe}&multi_use=true", 400, "single-use"),
        ("probe_id={probe}&no_expiry=true", 400, "expires"),
    ],
)
def test_re_enrolment_token_creation_validates(
    fleet_server: LiveServer, admin: httpx.Client, query: str, status: int, fragment: str
) -> None:
    token = admin.post("/api/v1/tokens").json()["token"]
    probe = _register(fleet_server, token, f"theta-{status}-{len(query)}").json()["probe_id"]
    before = len(admin.get("/api/v1/tokens").json())
    answer = admin.post("/api/v1/tokens?" + query.format(probe=probe))
    assert answer.status_code == status and fragment in answer.json()["error"]["message"]
    assert len(admin.get("/api/v1/tokens").json()) == before


def test_probe_init_writes_private_config_and_inventory_arrives(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    probe: ProbeProcess = spawn_probe("delta", tags="web,eu", heartbeat_s=0.5)
    path = probe.config_dir / "probe.yaml"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    config = yaml.safe_load(path.read_text())
    assert config["probe_id"] == probe.probe_id and config["tags"] == ["web", "eu"]
    assert config["policy_level"] == "diagnose"
    detail = wait_for(
        lambda: (
            (d := admin.get(f"/api/v1/probes/{probe.probe_id}").json())["inventory"]
            and d["metrics"]
            and d
        )
    )
    inventory = detail["inventory"]
    assert inventory["kernel"] == os.uname().release
    assert inventory["cpus"]["logical"] == os.cpu_count()
    assert inventory["memory"]["total"] > 0 and inventory["disks"] and inventory["users"]
    assert any(pkg["name"] == "bash" for pkg in inventory["packages"])
    assert 0 <= detail["metrics"]["memory_percent"] <= 100 and detail["metrics"]["uptime_s"] > 0
    assert detail["status"] in ("online", "degraded") and detail["max_level"] == "diagnose"
    assert detail["tags"] == ["eu", "web"]
    health = admin.get(f"/api/v1/probes/{probe.probe_id}/health").json()
    assert 0 <= health["score"] <= 100 and isinstance(health["reasons"], list)
    status = probe_status(probe)
    assert status["probe_id"] == probe.probe_id and status["server_reachable"] is True
    assert "api_key" not in status


def probe_status(probe: ProbeProcess) -> dict:  # type: ignore[type-arg]
    import json
    import subprocess

    from tests.support import BIN

    done = subprocess.run(
        [str(BIN / "legator-probe"), "status", "--json", "--config-dir", str(probe.config_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_offline_detection_and_events(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    subscription = fleet_server.core.events.subscribe("probe.*")
    probe = spawn_probe("epsilon")
    probe.stop()
    wait_for(
        lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["status"] == "offline",
        timeout=15,
    )
    topics = []
    while not subscription.queue.empty():
        topics.append(subscription.queue.get_nowait().topic)
    assert {"probe.registered", "probe.connected", "probe.disconnected", "probe.offline"} <= set(
        topics
    )
    metrics = admin.get("/metrics").text
    assert 'legator_fleet_probes{status="offline"} 1.0' in metrics


def test_auto_init_from_environment(
    fleet_server: LiveServer, admin: httpx.Client, tmp_path: Path
) -> None:
    token = admin.post("/api/v1/tokens").json()["token"]
    probe = ProbeProcess(fleet_server, tmp_path / "auto", tmp_path / "auto.log")
    probe.start(
        LEGATOR_SERVER_URL=fleet_server.url,
        LEGATOR_TOKEN=token,
        LEGATOR_TAGS="auto,x",
        LEGATOR_HOSTNAME="zeta",
    )
    try:
        found = wait_for(
            lambda: [
                p
                for p in admin.get("/api/v1/probes").json()
                if p["hostname"] == "zeta" and p["connected"]
            ]
        )
        assert found[0]["tags"] == ["auto", "x"]
    finally:
        probe.stop()


@pytest.mark.parametrize("bad", [{"hostname": "bad host"}, {"tags": ["no spaces"]}])
def test_register_validates_input(fleet_server: LiveServer, bad: dict) -> None:  # type: ignore[type-arg]
    body = {"token": "prb_x", "hostname": "ok", **bad}
    response = httpx.post(fleet_server.url + "/api/v1/register", json=body)
    assert response.status_code == 422


def test_unused_probe_row_is_offline_until_it_connects(
    fleet_server: LiveServer, admin: httpx.Client
) -> None:
    token = admin.post("/api/v1/tokens").json()["token"]
    probe_id = _register(fleet_server, token, "eta").json()["probe_id"]
    assert admin.get(f"/api/v1/probes/{probe_id}").json()["status"] == "offline"
    set_probe(fleet_server, probe_id, tags=["z"])
    assert admin.get("/api/v1/fleet/tags").json() == {"z": 1}
