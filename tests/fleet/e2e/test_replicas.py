"""Two replicas on one PostgreSQL, joined by NATS, with real probes on each of them."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from legator.fleet.hub import ProbeNotConnected
from legator.fleet.protocol import T_PING, CommandResult, new_envelope, sign
from tests.fleet.e2e.conftest import ProbeProcess, unattended_policy, wait_for
from tests.fleet.e2e.helpers import fleet, send_raw
from tests.support import LiveServer, NatsServer, ServerProcess, cluster_settings, replica_pair

pytestmark = pytest.mark.postgres
FAST = {
    "fleet_offline_after_s": 4,
    "fleet_flush_interval_s": 0.3,
    "fleet_command_grace_s": 3,
    "nats_presence_interval_s": 0.5,
}


@pytest.fixture
def pair(pg_url: str, tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    with replica_pair(tmp_path, cluster_settings(pg_url, **FAST)) as replicas:
        yield replicas


class Probes:
    """Enrol through one replica, connect to whichever the test says."""

    def __init__(self, admin: httpx.Client, tmp_path: Path) -> None:
        self.admin = admin
        self.tmp_path = tmp_path
        self.started: list[ProbeProcess] = []

    def spawn(self, name: str, server: LiveServer | ServerProcess, *, tags: str = "") -> str:
        token = self.admin.post("/api/v1/tokens").json()["token"]
        probe = ProbeProcess(server, self.tmp_path / f"cfg-{name}", self.tmp_path / f"{name}.log")  # type: ignore[arg-type]
        done = probe.init(
            token, hostname=name, tags=tags, server_url=server.url, max_level="remediate"
        )
        assert done.returncode == 0, done.stderr
        policy = unattended_policy(self.admin)
        applied = self.admin.post(f"/api/v1/probes/{probe.probe_id}/apply-policy/{policy}")
        assert applied.status_code == 200, applied.text
        probe.start()
        self.started.append(probe)
        return probe.probe_id

    def stop(self) -> None:
        for probe in self.started:
            probe.stop()


@pytest.fixture
def probes(pair: tuple[LiveServer, LiveServer], tmp_path: Path) -> Iterator[Probes]:
    a, _ = pair
    with a.client(a.admin_key) as admin:
        made = Probes(admin, tmp_path)
        try:
            yield made
        finally:
            made.stop()


def connected(client: httpx.Client, probe_id: str) -> bool:
    return bool(client.get(f"/api/v1/probes/{probe_id}").json().get("connected"))


def wait_connected(clients: list[httpx.Client], probe_id: str) -> None:
    for client in clients:
        wait_for(lambda c=client: connected(c, probe_id))
    time.sleep(0.3)  # the policy pushed on connect reaches the probe


def sse_lines(client: httpx.Client, url: str) -> list[str]:
    """A command's stream, read to its end (it ends after the ``result`` event)."""
    with client.stream("GET", url, timeout=30) as response:
        assert response.status_code == 200, response.read()
        return list(response.iter_lines())


class EventWatcher:
    """A live ``/api/v1/events`` subscription read on a thread."""

    def __init__(self, client: httpx.Client, topics: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(client, topics), daemon=True)
        self._thread.start()
        assert self.ready.wait(10)
        time.sleep(0.3)  # the subscription is made once the response has started

    def _read(self, client: httpx.Client, topics: str) -> None:
        try:
            with client.stream("GET", f"/api/v1/events?topics={topics}", timeout=60) as response:
                self.ready.set()
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.events.append(json.loads(line[5:]))
                    if self._stop.is_set():
                        return
        except httpx.HTTPError:
            return  # the client was closed under us: the test is over

    def matching(self, topic: str, **data: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["topic"] == topic and all(e["data"].get(k) == v for k, v in data.items())
        ]

    def close(self) -> None:
        self._stop.set()


def test_commands_and_operations_through_the_other_replica(
    pair: tuple[LiveServer, LiveServer], probes: Probes
) -> None:
    a, b = pair
    with a.client(a.admin_key) as via_a, b.client(a.admin_key) as via_b:
        probe_id = probes.spawn("on-b", b)
        wait_connected([via_a, via_b], probe_id)
        assert probe_id in fleet(b).hub.connections and probe_id not in fleet(a).hub.connections

        done = via_a.post(f"/api/v1/probes/{probe_id}/command?wait=true", json={"command": "uname"})
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "completed" and done.json()["stdout"] == "Linux\n"

        # A result larger than one NATS message (1 MiB here) comes back whole.
        big = via_a.post(
            f"/api/v1/probes/{probe_id}/command?wait=true",
            json={"command": "yes | head -c 3000000", "shell": True},
        ).json()
        assert big["status"] == "completed" and big["truncated"] is True
        assert len(big["stdout"]) == 1024 * 1024

        started = via_a.post(
            f"/api/v1/probes/{probe_id}/command?stream=true",
            json={"command": "for i in 1 2 3; do echo line$i; sleep 0.3; done", "shell": True},
        )
        assert started.status_code == 200, started.text
        began = time.monotonic()
        lines = sse_lines(via_a, started.json()["stream_url"])
        # Live, not from the database: without relayed chunks and end, A would only notice
        # the end at its 15 s keep-alive re-read, and miss the chunks that came meanwhile.
        assert time.monotonic() - began < 10
        chunks = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        output = "".join(c["data"] for c in chunks if "seq" in c)
        assert "line1\nline2\nline3\n" in output
        assert chunks[-1]["status"] == "completed"

        read = via_a.get(
            f"/api/v1/probes/{probe_id}/files", params={"op": "read", "path": "/etc/hostname"}
        )
        assert read.status_code == 200, read.text
        assert read.json()["result"]

        policy = unattended_policy(via_a)
        pushed = via_a.post(f"/api/v1/probes/{probe_id}/apply-policy/{policy}").json()
        assert pushed["ok"] and pushed["detail"]["delivered"] is True

        rotated = via_a.post(f"/api/v1/probes/{probe_id}/rotate-key")
        assert rotated.status_code == 200, rotated.text
        again = via_a.post(f"/api/v1/probes/{probe_id}/command?wait=true", json={"command": "id"})
        assert again.json()["status"] == "completed"

        status = via_a.get("/api/v1/fleet/cluster").json()
        assert status["enabled"] and status["connected"] and status["replica"] == "replica-a"
        assert {"replica": "replica-b", "probes": 1} in [
            {k: r[k] for k in ("replica", "probes")} for r in status["replicas"]
        ]
        assert status["local_probes"] == 0
        assert via_b.get("/api/v1/fleet/summary").json()["connected"] == 1
        assert via_a.get("/api/v1/fleet/summary").json()["connected"] == 1

        # Deleting through A closes the socket that B holds.
        assert via_a.delete(f"/api/v1/probes/{probe_id}").status_code == 204
        wait_for(lambda: probe_id not in fleet(b).hub.connections)


def test_only_envelopes_signed_for_the_probe_cross_replicas(
    pair: tuple[LiveServer, LiveServer], probes: Probes
) -> None:
    a, b = pair
    with a.client(a.admin_key) as via_a:
        probe_id = probes.spawn("guarded", b)
        wait_connected([via_a], probe_id)
        hub = fleet(a).hub
        unsigned = new_envelope(T_PING, {})
        with pytest.raises(ProbeNotConnected, match="not signed"):
            send_raw(a, probe_id, unsigned)
        wrong_key = sign(new_envelope(T_PING, {}), secrets.token_hex(32))
        with pytest.raises(ProbeNotConnected, match="not signed"):
            send_raw(a, probe_id, wrong_key)
        ack = a.call(hub.call(probe_id, T_PING, {}, wait_s=10))  # signed here, sent from B
        assert ack.ok and ack.type == T_PING
        with pytest.raises(ProbeNotConnected, match="not connected to any replica"):
            a.call(hub.call("prb-00000000", T_PING, {}, wait_s=2))


def test_a_socket_older_than_one_on_another_replica_is_let_go(
    pair: tuple[LiveServer, LiveServer], probes: Probes
) -> None:
    """What B does when another replica announces a newer socket for a probe B holds (B's
    is half-open after a network change): B closes its own, and the probe reconnects."""
    a, b = pair
    with a.client(a.admin_key) as via_a:
        probe_id = probes.spawn("moving", b)
        wait_connected([via_a], probe_id)
        old = fleet(b).hub.connections[probe_id]
        news = {"op": "up", "probes": [probe_id], "since": time.time()}
        b.call(_presence(b, "replica-c", news))
        wait_for(lambda: fleet(b).hub.connections.get(probe_id) not in (None, old), timeout=15)
        wait_for(lambda: fleet(a).hub.cluster.holder(probe_id) == "replica-b")  # type: ignore[union-attr]
        done = via_a.post(f"/api/v1/probes/{probe_id}/command?wait=true", json={"command": "id"})
        assert done.json()["status"] == "completed"


def test_a_waiting_request_hears_of_a_result_another_replica_stored(
    pair: tuple[LiveServer, LiveServer], probes: Probes
) -> None:
    """The probe reconnected to another replica mid-command and delivered its result there:
    that replica stores it and publishes command.finished, which wakes the request at once
    (no reply comes back the usual way: that replica did not route the command)."""
    a, b = pair
    with a.client(a.admin_key) as via_a:
        probe_id = probes.spawn("slow", b)
        wait_connected([via_a], probe_id)
        answer: dict[str, Any] = {}

        def wait_on_a() -> None:
            with a.client(a.admin_key) as mine:
                answer.update(
                    mine.post(
                        f"/api/v1/probes/{probe_id}/command?wait=true",
                        json={"command": "sleep 30", "shell": True, "timeout_s": 60},
                        timeout=120,
                    ).json()
                )

        waiting = threading.Thread(target=wait_on_a, daemon=True)
        waiting.start()
        wait_for(lambda: via_a.get("/api/v1/commands/pending").json() != [])
        (pending,) = via_a.get("/api/v1/commands/pending").json()
        result = CommandResult(
            request_id=pending["request_id"], status="completed", exit_code=0, stdout="moved\n"
        )
        began = time.monotonic()
        b.call(_stored_elsewhere(b, probe_id, result))
        waiting.join(timeout=20)
        assert not waiting.is_alive() and time.monotonic() - began < 10
        assert answer["status"] == "completed" and answer["stdout"] == "moved\n"


async def _stored_elsewhere(server: LiveServer, probe_id: str, result: CommandResult) -> None:
    """What the replica a probe moved to does with its result: store it, and say so."""
    commands = fleet(server).commands
    assert await commands._store(probe_id, result)
    await commands.events.publish(
        "command.finished",
        {"request_id": result.request_id, "probe_id": probe_id, "status": result.status},
    )


async def _presence(server: LiveServer, origin: str, body: dict[str, Any]) -> None:
    fleet(server).hub.cluster._on_presence(origin, body)  # type: ignore[union-attr]


def test_fan_out_by_tag_across_both_replicas(
    pair: tuple[LiveServer, LiveServer], probes: Probes
) -> None:
    a, b = pair
    with a.client(a.admin_key) as via_a, b.client(a.admin_key) as via_b:
        ids = [
            probes.spawn("split-a1", a, tags="split"),
            probes.spawn("split-b1", b, tags="split"),
            probes.spawn("split-b2", b, tags="split"),
        ]
        for probe_id in ids:
            wait_connected([via_a, via_b], probe_id)
        for client in (via_a, via_b):
            fan = client.post("/api/v1/fleet/by-tag/split/command", json={"command": "uname"})
            assert fan.status_code == 200, fan.text
            body = fan.json()
            assert body["targets"] == 3, body
            assert sorted(r["probe_id"] for r in body["results"]) == sorted(ids)
            assert all(r["ok"] and r["result"]["stdout"] == "Linux\n" for r in body["results"])


def test_events_reach_subscribers_on_every_replica_once(
    pair: tuple[LiveServer, LiveServer], probes: Probes
) -> None:
    a, b = pair
    with a.client(a.admin_key) as via_a, b.client(a.admin_key) as via_b:
        on_a = EventWatcher(via_a, "probe.*,command.*")
        on_b = EventWatcher(via_b, "probe.*,command.*")
        try:
            probe_id = probes.spawn("evented", b)
            wait_for(lambda: on_a.matching("probe.connected", probe_id=probe_id))
            done = via_b.post(
                f"/api/v1/probes/{probe_id}/command?wait=true", json={"command": "uname"}
            ).json()
            request_id = done["request_id"]
            for watcher in (on_a, on_b):
                wait_for(lambda w=watcher: w.matching("command.finished", request_id=request_id))
            via_a.post(f"/api/v1/probes/{probe_id}/command?wait=true", json={"command": "id"})
            time.sleep(0.5)
            for watcher in (on_a, on_b):
                assert len(watcher.matching("probe.connected", probe_id=probe_id)) == 1
                assert len(watcher.matching("command.finished", request_id=request_id)) == 1
                assert len(watcher.matching("command.finished", probe_id=probe_id)) == 2
                assert len({e["id"] for e in watcher.events}) == len(watcher.events)
        finally:
            on_a.close()
            on_b.close()


def test_a_replica_without_nats_degrades_clearly_and_recovers(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nats = NatsServer().start()
    shared = cluster_settings(pg_url, nats.url, **FAST)
    a = LiveServer(tmp_path / "a", replica_id="replica-a", **shared).start()
    log_b = tmp_path / "b.log"
    b = ServerProcess(
        tmp_path / "b",
        log_path=log_b,
        LEGATOR_DATABASE_URL=pg_url,
        LEGATOR_SIGNING_KEY=shared["signing_key"],
        LEGATOR_SECRETS_KEK=shared["secrets_kek"],
        LEGATOR_NATS_URL=nats.url,
        LEGATOR_NATS_SUBJECT_PREFIX=shared["nats_subject_prefix"],
        LEGATOR_NATS_PRESENCE_INTERVAL_S="0.5",
        LEGATOR_REPLICA_ID="replica-b",
        LEGATOR_FLEET_FLUSH_INTERVAL_S="0.3",
        LEGATOR_LOG_FORMAT="json",
    ).start()
    key = a.admin_key
    try:
        with (
            a.client(key) as via_a,
            httpx.Client(
                base_url=b.url, headers={"Authorization": f"Bearer {a.admin_key}"}
            ) as via_b,
        ):
            made = Probes(via_a, tmp_path)
            try:
                local = made.spawn("stays-on-a", a)
                remote = made.spawn("lives-on-b", b)
                wait_connected([via_a, via_b], local)
                wait_connected([via_a, via_b], remote)

                def run(probe_id: str) -> httpx.Response:
                    return via_a.post(
                        f"/api/v1/probes/{probe_id}/command?wait=true", json={"command": "uname"}
                    )

                assert run(remote).json()["status"] == "completed"

                nats.stop()
                wait_for(lambda: not via_a.get("/api/v1/fleet/cluster").json()["connected"])
                assert "lost the connection to NATS" in capsys.readouterr().out
                refused = run(remote)
                assert refused.status_code == 503, refused.text
                message = refused.json()["error"]["message"]
                assert "cluster bus (NATS) is unreachable" in message and remote in message
                assert run(local).json()["status"] == "completed"  # its own probes still work
                assert not connected(via_a, remote) and connected(via_b, remote)
                down = via_a.get("/api/v1/fleet/cluster").json()
                assert down["down_since"] and down["local_probes"] == 1

                nats.start()  # the same port: both replicas reconnect on their own
                wait_for(lambda: via_a.get("/api/v1/fleet/cluster").json()["connected"])
                wait_for(lambda: connected(via_a, remote), timeout=10)
                assert run(remote).json()["status"] == "completed"
                wait_for(lambda: "reconnected to NATS" in log_b.read_text())
                text = log_b.read_text()
                assert "lost the connection to NATS" in text
                assert shared["signing_key"] not in text
            finally:
                made.stop()
    finally:
        b.stop()
        a.stop()
        nats.stop()


def test_routing_needs_the_same_signing_key(pg_url: str, tmp_path: Path) -> None:
    """A replica started with another key cannot read or forge the others' messages."""
    shared = cluster_settings(pg_url, **FAST)
    a = LiveServer(tmp_path / "a", replica_id="replica-a", **shared).start()
    stranger = LiveServer(
        tmp_path / "x", replica_id="stranger", **{**shared, "signing_key": secrets.token_hex(32)}
    ).start()
    try:
        time.sleep(1.5)  # several presence beats
        assert fleet(a).hub.cluster.replicas.keys() == set()  # type: ignore[union-attr]
        assert fleet(stranger).hub.cluster.replicas.keys() == set()  # type: ignore[union-attr]
        dropped = a.core.metrics.registry.get_sample_value(  # type: ignore[union-attr]
            "legator_cluster_dropped_messages_total", {"reason": "unauthenticated"}
        )
        assert dropped and dropped > 0
    finally:
        stranger.stop()
        a.stop()
