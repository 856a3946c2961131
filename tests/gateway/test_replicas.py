"""The gateway on two replicas (one PostgreSQL, joined by NATS): what an admin changes through
one replica, the other serves within moments, without a restart."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, insert, select

from legator.core.audit.models import AuditEvent
from legator.core.db import utcnow
from legator.gateway.models import GatewayReservation
from legator.gateway.service import Gateway
from tests.gateway.conftest import new_key, register
from tests.gateway.scripted_upstream import ScriptedUpstream
from tests.support import LiveServer, NatsServer, cluster_settings, free_port, replica_pair

pytestmark = pytest.mark.postgres
# Well inside the periodic re-read (30 s): what converges this fast came by the bus. Not
# tighter: on a loaded 2-core machine a usage batch and its announcement once took over 3 s.
PROMPT_S = 10.0


@pytest.fixture
def pair(pg_url: str, tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    with replica_pair(tmp_path, cluster_settings(pg_url)) as replicas:
        yield replicas


def soon(predicate: Callable[[], Any], timeout: float = PROMPT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:g} s")
        time.sleep(0.05)


def chat(client: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}]}
    return client.post("/v1/chat/completions", json=body)


def gateway(server: LiveServer) -> Gateway:
    assert server.app is not None
    return server.app.state.gateway  # type: ignore[no-any-return]


def live_entry(server: LiveServer, key: str, model: str) -> dict[str, Any]:
    """``model``'s entry in the first event of the live metrics stream ``key`` opens."""
    with server.client(key) as client, client.stream("GET", "/api/v1/gateway/events") as stream:
        data = next(line for line in stream.iter_lines() if line.startswith("data:"))
    return next(m for m in json.loads(data[5:])["models"] if m["model"] == model)


def test_the_catalogue_changed_through_one_replica_is_served_by_the_other(
    pair: tuple[LiveServer, LiveServer], upstream: ScriptedUpstream
) -> None:
    a, b = pair
    with a.client(a.admin_key) as admin_a, b.client(a.admin_key) as admin_b:
        key = new_key(admin_a, "alice")
        with a.client(key) as alice_a, b.client(key) as alice_b:
            assert chat(alice_b, "echo").status_code == 404
            register(admin_a, "echo", upstream.url, upstream_model="echo", parallel=2)
            soon(lambda: chat(alice_b, "echo").status_code == 200)
            assert [m["id"] for m in alice_b.get("/v1/models").json()["data"]] == ["echo"]

            # An update through B: A's scheduler takes the new slot count, A refuses it
            # once disabled.
            changed = admin_b.patch("/api/v1/gateway/models/echo", json={"parallel": 5})
            assert changed.status_code == 200, changed.text
            soon(lambda: gateway(a).catalog.models["echo"].parallel == 5)
            assert chat(alice_a, "echo").status_code == 200
            assert gateway(a).scheduler.pools["echo"].parallel == 5
            admin_b.patch("/api/v1/gateway/models/echo", json={"state": "disabled"})
            soon(lambda: chat(alice_a, "echo").status_code == 503)
            admin_b.patch("/api/v1/gateway/models/echo", json={"state": "ready"})
            soon(lambda: chat(alice_a, "echo").status_code == 200)

            # A category made through A resolves through B.
            made = admin_a.post(
                "/api/v1/gateway/categories", json={"name": "general", "preferred_model": "echo"}
            )
            assert made.status_code == 201, made.text
            joined = admin_a.patch("/api/v1/gateway/models/echo", json={"categories": ["general"]})
            assert joined.status_code == 200, joined.text
            soon(lambda: chat(alice_b, "general").status_code == 200)

            # Deleted through B: gone from A.
            assert admin_b.delete("/api/v1/gateway/models/echo").status_code == 204
            soon(lambda: chat(alice_a, "echo").status_code == 404)
            assert alice_a.get("/v1/models").json()["data"] == []


def test_replicas_with_urls_serve_each_model_from_one_of_them(
    pg_url: str, tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    """One slot, requests through both replicas at once: the upstream never gets two."""
    with (
        replica_pair(tmp_path, cluster_settings(pg_url), own_urls=True) as (a, b),
        a.client(a.admin_key) as admin_a,
        b.client(a.admin_key) as admin_b,
    ):
        register(admin_a, "slow", upstream.url, upstream_model="slow", parallel=1)
        key = new_key(admin_a, "alice")
        soon(
            lambda: gateway(a).homes.home_of("slow") != gateway(b).homes.home_of("slow"),
            timeout=10,
        )
        home, other = (a, b) if gateway(a).homes.home_of("slow") is None else (b, a)
        assert gateway(other).homes.home_of("slow").url == home.url  # type: ignore[union-attr]
        home_id = "replica-a" if home is a else "replica-b"
        assert gateway(other).served_by("slow") == home_id
        assert gateway(home).served_by("slow") is None
        # The live metrics name the serving replica to admins only.
        assert live_entry(other, a.admin_key, "slow")["served_by"] == home_id
        login = admin_a.post("/api/v1/keys", json={"user": "alice"}).json()["key"]
        seen = live_entry(other, login, "slow")
        assert seen["served_elsewhere"] is True and "served_by" not in seen
        soon(lambda: chat(admin_b, "slow").status_code == 200, timeout=10)
        before = upstream.requests.__len__()

        def ask(server: LiveServer) -> int:
            with server.client(key, timeout=30) as client:
                return chat(client, "slow").status_code

        results: list[int] = []
        threads = [
            threading.Thread(target=lambda s=s: results.append(ask(s))) for s in (a, b, a, b, a, b)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [200] * 6
        assert len(upstream.requests) - before == 6
        assert upstream.peak_slow_answers == 1  # one slot in the whole cluster
        metrics = admin_b.get("/metrics").text if other is b else admin_a.get("/metrics").text
        assert "legator_gateway_forwarded_requests_total" in metrics

        # A client leaving a forwarded stream frees the home's slot (no leak).
        long_prompt = " ".join(["word"] * 200)  # 10 s of slow chunks
        body = {"model": "slow", "stream": True}
        body["messages"] = [{"role": "user", "content": long_prompt}]
        with (
            other.client(key) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as streamed,
        ):
            assert streamed.status_code == 200
            # Kept: a discarded iterator is closed at once, and httpx then closes the stream.
            lines = streamed.iter_lines()
            next(lines)
            soon(lambda: gateway(home).scheduler.pools["slow"].in_use == 1, timeout=10)
        soon(lambda: gateway(home).scheduler.pools["slow"].in_use == 0, timeout=10)
        soon(lambda: upstream.active_streams == 0, timeout=10)

        # The home shuts down: the other serves the model itself at once.
        home.stop()
        with other.client(key) as client:
            assert chat(client, "slow").status_code == 200


def test_a_replica_url_that_does_not_answer_gets_nothing_forwarded(
    pg_url: str, tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    """B announces a wrong URL: A serves B's share of the models itself, and no client sees
    an error."""
    dead = {"replica_url": f"http://127.0.0.1:{free_port()}"}
    with (
        replica_pair(tmp_path, cluster_settings(pg_url), own_urls=True, b_settings=dead) as (a, b),
        a.client(a.admin_key) as admin_a,
        b.client(a.admin_key) as admin_b,
    ):
        models = [f"echo-{i}" for i in range(6)]
        for model in models:
            register(admin_a, model, upstream.url, upstream_model="echo")

        # B hears A's good URL and forwards A's share there; A never routes to B.
        def b_forwards_to_a() -> bool:
            assert all(chat(admin_b, m).status_code == 200 for m in models)
            metrics = admin_b.get("/metrics").text
            return 'legator_gateway_forwarded_requests_total{replica="replica-a"}' in metrics

        soon(b_forwards_to_a, timeout=10)
        assert all(chat(admin_a, m).status_code == 200 for m in models)
        assert all(gateway(a).homes.home_of(m) is None for m in models)
        assert "legator_gateway_forwarded_requests_total{" not in admin_a.get("/metrics").text


def test_scheduler_settings_reach_every_replica(pair: tuple[LiveServer, LiveServer]) -> None:
    a, b = pair
    with b.client(a.admin_key) as admin_b:
        answer = admin_b.patch(
            "/api/v1/gateway/settings", json={"max_queue": 7, "usage_weight": 2.5}
        )
        assert answer.status_code == 200, answer.text
    soon(lambda: gateway(a).scheduler.config.max_queue == 7)
    assert gateway(a).scheduler.config.usage_weight == 2.5


def window() -> dict[str, str]:
    start = utcnow().replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return {
        "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(minutes=60)).isoformat(),
    }


def test_a_reservation_activated_on_one_replica_holds_on_the_other(
    pair: tuple[LiveServer, LiveServer], upstream: ScriptedUpstream
) -> None:
    a, b = pair
    with a.client(a.admin_key) as admin_a:
        register(admin_a, "echo", upstream.url, upstream_model="echo")
        other = new_key(admin_a, "other")
        new_key(admin_a, "holder")
        made = admin_a.post("/api/v1/gateway/reservations", json={**window(), "user": "holder"})
        assert made.status_code == 201, made.text
        rid = made.json()["id"]
        with b.client(other) as other_b:
            soon(lambda: chat(other_b, "echo").status_code == 200)
            admin_a.post(f"/api/v1/gateway/reservations/{rid}/approve").raise_for_status()
            admin_a.post(f"/api/v1/gateway/reservations/{rid}/activate").raise_for_status()
            # Before B's own tick (every 5 s) would have noticed.
            soon(lambda: chat(other_b, "echo").status_code == 503, timeout=2)
            assert "reserved until" in chat(other_b, "echo").text
            admin_a.post(f"/api/v1/gateway/reservations/{rid}/deactivate").raise_for_status()
            soon(lambda: chat(other_b, "echo").status_code == 200, timeout=2)


def test_replicas_ticking_together_change_a_reservation_once(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    """Both replicas tick; on PostgreSQL one takes a due reservation, the other skips it."""
    a, b = pair
    assert a.core is not None
    now = utcnow()

    async def add_due() -> list[str]:
        rows = [
            {
                "user_id": "user-holder",
                "username": "holder",
                "starts_at": now - timedelta(minutes=1),
                "ends_at": now - timedelta(seconds=1),  # due to complete
                "state": "approved",
                "reason": "",
            }
            for _ in range(40)
        ]
        async with a.core.db.write() as session:  # type: ignore[union-attr]
            result = await session.execute(
                insert(GatewayReservation).returning(GatewayReservation.id), rows
            )
            return list(result.scalars())

    async def completions() -> int:
        async with a.core.db.session() as session:  # type: ignore[union-attr]
            return int(
                await session.scalar(
                    select(func.count())
                    .select_from(AuditEvent)
                    .where(AuditEvent.action == "gateway.reservation.completed")
                )
                or 0
            )

    ids = a.call(add_due())
    ticks = [
        threading.Thread(target=lambda s=server: s.call(gateway(s).reservations.tick()))
        for server in (a, b, a, b)
    ]
    for thread in ticks:
        thread.start()
    for thread in ticks:
        thread.join()
    assert a.call(completions()) == len(ids)


class CutOff:
    """Two replicas on a private NATS that a test stops and starts; admin clients on each."""

    def __init__(self, nats: NatsServer, a: LiveServer, b: LiveServer) -> None:
        self.nats, self.a, self.b = nats, a, b
        self.admin_a = a.client(a.admin_key)
        self.admin_b = b.client(a.admin_key)

    def cut(self) -> None:
        self.nats.stop()
        soon(lambda: not self.admin_a.get("/api/v1/fleet/cluster").json()["connected"], 10)

    def restore(self) -> None:
        self.nats.start()
        soon(lambda: self.admin_b.get("/api/v1/fleet/cluster").json()["connected"], 10)


@pytest.fixture
def cut_off(pg_url: str, tmp_path: Path) -> Iterator[CutOff]:
    nats = NatsServer().start()
    try:
        with replica_pair(tmp_path, cluster_settings(pg_url, nats.url)) as (a, b):
            pair = CutOff(nats, a, b)
            with pair.admin_a, pair.admin_b:
                yield pair
    finally:
        nats.stop()


def test_changes_made_while_nats_was_down_reach_the_other_replica(
    cut_off: CutOff, upstream: ScriptedUpstream
) -> None:
    key = new_key(cut_off.admin_a, "alice")
    cut_off.cut()
    register(cut_off.admin_a, "echo", upstream.url, upstream_model="echo")  # told nobody
    with cut_off.b.client(key) as alice_b:
        time.sleep(0.5)
        assert chat(alice_b, "echo").status_code == 404
        cut_off.restore()
        soon(lambda: chat(alice_b, "echo").status_code == 200)


def recent_tokens(server: LiveServer, user_id: str) -> int:
    async def read() -> int:
        return gateway(server).scheduler.usage.recent(user_id, 3600)

    return server.call(read())


def billed_tokens(admin: httpx.Client, username: str) -> int:
    report = admin.get("/api/v1/gateway/usage/all", params={"period": "hour"}).json()
    rows = [row for row in report["by_user"] if row["group"] == username]
    return sum(row["input_tokens"] + row["output_tokens"] for row in rows)


def user_id_of(admin: httpx.Client, username: str) -> str:
    return admin.get(f"/api/v1/users/{username}").json()["id"]  # type: ignore[no-any-return]


def test_a_users_tokens_through_one_replica_count_against_them_on_the_other(
    pair: tuple[LiveServer, LiveServer], upstream: ScriptedUpstream
) -> None:
    """Fairness looks at a user's tokens on every replica: a heavy user spread over the
    balancer is as heavy on each replica as on one."""
    a, b = pair
    with a.client(a.admin_key) as admin_a:
        key = new_key(admin_a, "alice")
        alice = user_id_of(admin_a, "alice")
        register(admin_a, "echo", upstream.url, upstream_model="echo")
        with a.client(key) as alice_a, b.client(key) as alice_b:
            soon(lambda: chat(alice_b, "echo").status_code == 200)
            for _ in range(5):
                assert chat(alice_a, "echo").status_code == 200
            soon(lambda: billed_tokens(admin_a, "alice") > 0)
            # Both replicas count what both billed, within moments (rows are written every
            # half second, then announced).
            soon(
                lambda: (
                    recent_tokens(a, alice)
                    == recent_tokens(b, alice)
                    == billed_tokens(admin_a, "alice")
                )
            )


def test_tokens_billed_while_nats_was_down_count_on_the_other_replica(
    cut_off: CutOff, upstream: ScriptedUpstream
) -> None:
    a, b, admin = cut_off.a, cut_off.b, cut_off.admin_a
    key = new_key(admin, "alice")
    alice = user_id_of(admin, "alice")
    register(admin, "echo", upstream.url, upstream_model="echo")
    with a.client(key) as alice_a:
        soon(lambda: chat(alice_a, "echo").status_code == 200)
        soon(lambda: recent_tokens(b, alice) == billed_tokens(admin, "alice") > 0)
        cut_off.cut()
        for _ in range(3):  # billed, announced to nobody
            assert chat(alice_a, "echo").status_code == 200
        soon(lambda: recent_tokens(a, alice) == billed_tokens(admin, "alice"))
        assert recent_tokens(b, alice) < recent_tokens(a, alice)
        cut_off.restore()
        soon(lambda: recent_tokens(b, alice) == recent_tokens(a, alice))
        assert recent_tokens(b, alice) == billed_tokens(admin, "alice")
