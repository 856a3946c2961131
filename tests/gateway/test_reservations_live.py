"""Reservations, the live metrics stream and usage rows surviving a clean shutdown."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from legator.core.auth.permissions import permissions_for_role
from legator.core.auth.principal import Principal
from legator.core.db import Database, utcnow
from legator.core.errors import Conflict
from legator.gateway import reservations
from legator.gateway.models import GatewayReservation
from tests.gateway.conftest import new_key
from tests.support import LiveServer, eventually, live_server


def window(hours_from_now: int = 1, length_min: int = 60) -> dict[str, str]:
    start = utcnow().replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours_from_now)
    return {
        "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(minutes=length_min)).isoformat(),
    }


async def shift(db: Database, reservation_id: str, hours: float) -> None:
    """Moves a reservation's window ``hours`` earlier, as if that much time had passed."""
    async with db.write() as session:
        row = await session.get(GatewayReservation, reservation_id)
        assert row is not None
        row.starts_at -= timedelta(hours=hours)
        row.ends_at -= timedelta(hours=hours)


def chat(gw: LiveServer, key: str) -> None:
    openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "x"}]
    )


def test_reservation_validation(gw: LiveServer, admin: httpx.Client) -> None:
    good = window()
    odd = {**good, "starts_at": good["starts_at"].replace(":00:00", ":10:00")}
    assert "30-minute" in admin.post("/api/v1/gateway/reservations", json=odd).text
    short = window(length_min=0)
    assert admin.post("/api/v1/gateway/reservations", json=short).status_code == 400
    past = window(hours_from_now=-2)
    assert "future" in admin.post("/api/v1/gateway/reservations", json=past).text
    first = admin.post("/api/v1/gateway/reservations", json=good).json()
    assert first["state"] == "pending"
    # A pending one does not block; an approved one does.
    second = admin.post("/api/v1/gateway/reservations", json=good)
    assert second.status_code == 201
    assert admin.post(f"/api/v1/gateway/reservations/{first['id']}/approve").json()["state"] == (
        "approved"
    )
    assert admin.post("/api/v1/gateway/reservations", json=good).status_code == 409
    overlapping = admin.post(f"/api/v1/gateway/reservations/{second.json()['id']}/approve")
    assert overlapping.status_code == 409
    assert admin.post(f"/api/v1/gateway/reservations/{first['id']}/reject").status_code == 409


def test_active_reservation_blocks_everyone_but_the_holder(
    gw: LiveServer, admin: httpx.Client
) -> None:
    holder_key = new_key(admin, "holder")
    other_key = new_key(admin, "other")
    service_key = new_key(admin, "svc", service=True)
    with gw.client(admin.post("/api/v1/keys", json={"user": "holder"}).json()["key"]) as holder:
        created = holder.post("/api/v1/gateway/reservations", json=window())
        assert created.status_code == 201
        rid = created.json()["id"]
        assert holder.post(f"/api/v1/gateway/reservations/{rid}/approve").status_code == 403
    events = gw.core.events.subscribe("gateway.reservation.*")  # type: ignore[union-attr]
    assert admin.post(f"/api/v1/gateway/reservations/{rid}/approve").status_code == 200
    assert admin.post(f"/api/v1/gateway/reservations/{rid}/activate").json()["state"] == "active"
    chat(gw, holder_key)
    chat(gw, service_key)
    with pytest.raises(openai.InternalServerError) as err:
        chat(gw, other_key)
    assert err.value.status_code == 503
    assert "reserved until" in err.value.message
    assert admin.post(f"/api/v1/gateway/reservations/{rid}/deactivate").json()["state"] == (
        "completed"
    )
    chat(gw, other_key)
    topics = []
    while (event := gw.call(events.get(wait=0.1))) is not None:
        topics.append(event.topic)
    assert topics == [
        "gateway.reservation.approved",
        "gateway.reservation.active",
        "gateway.reservation.completed",
    ]


def test_tick_activates_completes_and_cancels(gw: LiveServer, admin: httpx.Client) -> None:
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    db = gw.core.db  # type: ignore[union-attr]
    approved = admin.post("/api/v1/gateway/reservations", json=window(length_min=120)).json()
    admin.post(f"/api/v1/gateway/reservations/{approved['id']}/approve")
    pending = admin.post("/api/v1/gateway/reservations", json=window(hours_from_now=3)).json()
    gw.call(shift(db, approved["id"], 1.5))  # its window is now under way
    gw.call(shift(db, pending["id"], 3.5))  # its start passed without approval
    gw.call(gateway.reservations.tick())
    states = {r["id"]: r["state"] for r in admin.get("/api/v1/gateway/reservations").json()}
    assert states == {approved["id"]: "active", pending["id"]: "cancelled"}
    gw.call(shift(db, approved["id"], 2))
    gw.call(gateway.reservations.tick())
    assert admin.get("/api/v1/gateway/reservations").json()[0]["state"] == "completed"
    assert gateway.reservations.active is None


def test_users_cancel_only_their_own(gw: LiveServer, admin: httpx.Client) -> None:
    mine = admin.post("/api/v1/gateway/reservations", json=window()).json()
    new_key(admin, "mallory")
    key = admin.post("/api/v1/keys", json={"user": "mallory"}).json()["key"]
    with gw.client(key) as mallory:
        assert mallory.get("/api/v1/gateway/reservations").json() == []
        assert mallory.post(f"/api/v1/gateway/reservations/{mine['id']}/cancel").status_code == 404
    cancelled = admin.post(f"/api/v1/gateway/reservations/{mine['id']}/cancel")
    assert cancelled.json()["state"] == "cancelled"
    assert admin.delete(f"/api/v1/gateway/reservations/{mine['id']}").status_code == 204


def test_reservation_events_name_no_one(gw: LiveServer, admin: httpx.Client) -> None:
    # The core event stream goes to anyone with events:read (viewers too): its reservation
    # events tell the window and state, never who holds the reservation or why.
    new_key(admin, "alice")
    key = admin.post("/api/v1/keys", json={"user": "alice"}).json()["key"]
    events = gw.core.events.subscribe("gateway.reservation.*")  # type: ignore[union-attr]
    with gw.client(key) as alice:
        created = alice.post(
            "/api/v1/gateway/reservations", json={**window(), "reason": "secret eval"}
        ).json()
    assert admin.post(f"/api/v1/gateway/reservations/{created['id']}/approve").status_code == 200
    got = []
    while (event := gw.call(events.get(wait=0.1))) is not None:
        got.append(event)
    events.close()
    assert [e.topic for e in got] == ["gateway.reservation.created", "gateway.reservation.approved"]
    for event in got:
        assert event.data == {
            "id": created["id"],
            "state": event.topic.rsplit(".", 1)[1].replace("created", "pending"),
            "starts_at": created["starts_at"],
            "ends_at": created["ends_at"],
        }
        assert "alice" not in json.dumps(event.data)


def test_live_metrics_stream(gw: LiveServer, admin: httpx.Client) -> None:
    chat(gw, gw.admin_key)
    new_key(admin, "viewer1")
    with admin.stream("GET", "/api/v1/gateway/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = next(line for line in response.iter_lines() if line.startswith("data:"))
    snapshot = json.loads(data[5:])
    echo = next(m for m in snapshot["models"] if m["model"] == "echo")
    assert echo["slots"] == 1 and echo["in_use"] == 0 and echo["queue_depth"] == 0
    assert echo["served_by"] is None  # one replica: it serves every model
    assert echo["served_elsewhere"] is False
    assert echo["tokens_per_s"] > 0
    # A model no request has reached yet is listed too, idle, with its catalogue slots.
    slow = next(m for m in snapshot["models"] if m["model"] == "slow")
    assert slow["slots"] == 1 and slow["in_use"] == 0 and slow["tokens_per_s"] == 0
    # A non-admin sees only the models they may use: not a disabled one.
    assert admin.patch("/api/v1/gateway/models/die", json={"state": "disabled"}).status_code == 200
    login = admin.post("/api/v1/keys", json={"user": "viewer1"}).json()["key"]
    with gw.client(login) as viewer, viewer.stream("GET", "/api/v1/gateway/events") as got:
        data = next(line for line in got.iter_lines() if line.startswith("data:"))
    seen = json.loads(data[5:])["models"]
    assert [m["model"] for m in seen] == ["echo", "fail500", "slow", "tools"]
    assert all("served_by" not in m and m["served_elsewhere"] is False for m in seen)


def test_usage_rows_survive_a_clean_shutdown(gw: LiveServer, admin: httpx.Client) -> None:
    for _ in range(5):
        chat(gw, gw.admin_key)
    gw.restart()  # no explicit flush: shutdown must write what is pending
    with gw.client(gw.admin_key) as again:
        report = again.get("/api/v1/gateway/usage/all", params={"period": "day"}).json()
    assert report["requests"] == 5
    assert report["by_user"][0]["group"] == "admin"
    assert len(report["timeline"]) >= 1
    bad = admin.get("/api/v1/gateway/usage", params={"period": "year"})
    assert bad.status_code == 422


def test_prometheus_metrics(gw: LiveServer, admin: httpx.Client) -> None:
    chat(gw, gw.admin_key)
    text = admin.get("/metrics").text
    assert 'legator_gateway_requests_total{endpoint="chat",model="echo",status="200"} 1.0' in text
    assert 'legator_gateway_slots{model="echo"} 1.0' in text
    assert 'legator_gateway_slots_in_use{model="echo"} 0.0' in text
    assert 'legator_gateway_tokens_total{direction="output",model="echo"} 2.0' in text


def test_a_user_may_have_only_so_many_reservations_waiting(
    gw: LiveServer, admin: httpx.Client
) -> None:
    limit = reservations.MAX_WAITING_PER_USER
    new_key(admin, "bob")
    key = admin.post("/api/v1/keys", json={"user": "bob"}).json()["key"]
    url = "/api/v1/gateway/reservations"
    with gw.client(key) as bob:
        made = [bob.post(url, json=window(hours_from_now=1 + i)).json() for i in range(limit)]
        assert [r["state"] for r in made] == ["pending"] * limit
        # Approved ones count as well: they have not begun.
        assert admin.post(f"{url}/{made[0]['id']}/approve").status_code == 200
        over = bob.post(url, json=window(hours_from_now=limit + 1))
        assert over.status_code == 409
        assert f"the most one user may have ({limit})" in over.json()["error"]["message"]
        # A cancelled one no longer counts.
        assert bob.post(f"{url}/{made[1]['id']}/cancel").status_code == 200
        assert bob.post(url, json=window(hours_from_now=limit + 1)).status_code == 201
        assert bob.post(url, json=window(hours_from_now=limit + 2)).status_code == 409
    # Admins are not held to it, for themselves or for someone else.
    for hours in range(limit + 1):
        assert admin.post(url, json=window(hours_from_now=100 + hours)).status_code == 201
    assert admin.post(url, json={**window(hours_from_now=200), "user": "bob"}).status_code == 201


def test_a_reservation_starts_within_the_lead_time(gw: LiveServer, admin: httpx.Client) -> None:
    days = reservations.MAX_LEAD.days
    url = "/api/v1/gateway/reservations"
    too_far = admin.post(url, json=window(hours_from_now=24 * days + 1))
    assert too_far.status_code == 400
    assert f"must start within {days} days" in too_far.json()["error"]["message"]
    assert admin.post(url, json=window(hours_from_now=24 * days - 1)).status_code == 201


def test_a_tick_reads_only_the_reservations_that_are_due(
    gw: LiveServer, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    db = gw.core.db  # type: ignore[union-attr]
    start = utcnow().replace(minute=0, second=0, microsecond=0) + timedelta(days=2)

    async def seed() -> None:
        # Many reservations waiting for later, as many users could leave.
        async with db.write() as session:
            for i in range(300):
                begins = start + timedelta(hours=i)
                session.add(
                    GatewayReservation(
                        user_id=f"user-{i}",
                        username=f"user-{i}",
                        starts_at=begins,
                        ends_at=begins + timedelta(minutes=30),
                        state="approved" if i % 2 else "pending",
                    )
                )

    gw.call(seed())
    url = "/api/v1/gateway/reservations"
    approved = admin.post(url, json=window(length_min=120)).json()
    admin.post(f"{url}/{approved['id']}/approve")
    pending = admin.post(url, json=window(hours_from_now=3)).json()

    # What the tick itself (not the replica's other work meanwhile) reads and writes.
    ticking: set[asyncio.Task[Any]] = set()
    loaded: list[str] = []
    writes: list[int] = []

    def on_load(_session: Session, instance: object) -> None:
        if asyncio.current_task() in ticking and isinstance(instance, GatewayReservation):
            loaded.append(instance.id)

    real_write: Callable[..., AbstractAsyncContextManager[Any]] = db.write

    def counted_write(**kwargs: Any) -> AbstractAsyncContextManager[Any]:
        if asyncio.current_task() in ticking:
            writes.append(1)
        return real_write(**kwargs)

    async def tick() -> None:
        task = asyncio.current_task()
        assert task is not None
        ticking.add(task)
        await gateway.reservations.tick()

    monkeypatch.setattr(db, "write", counted_write)
    event.listen(Session, "loaded_as_persistent", on_load)
    try:
        gw.call(tick())  # nothing due: nothing read, no write transaction
        assert (loaded, writes) == ([], [])
        gw.call(shift(db, approved["id"], 1.5))  # its window is now under way
        gw.call(shift(db, pending["id"], 3.5))  # its start passed without approval
        gw.call(tick())
        assert set(loaded) == {approved["id"], pending["id"]}
        assert writes == [1]
    finally:
        event.remove(Session, "loaded_as_persistent", on_load)
    states = {r["id"]: r["state"] for r in admin.get(url).json()}
    assert (states[approved["id"]], states[pending["id"]]) == ("active", "cancelled")
    assert list(states.values()).count("pending") == 150
    assert list(states.values()).count("approved") == 150


def test_boundaries_are_on_the_utc_grid(gw: LiveServer, admin: httpx.Client) -> None:
    url = "/api/v1/gateway/reservations"
    day = (utcnow() + timedelta(days=2)).date().isoformat()
    # 09:00 at +05:45 is 03:15 UTC: off the grid, though on it in its own zone.
    nepal = {"starts_at": f"{day}T09:00:00+05:45", "ends_at": f"{day}T10:00:00+05:45"}
    refused = admin.post(url, json=nepal)
    assert refused.status_code == 400
    assert "30-minute" in refused.json()["error"]["message"]
    # 09:30 at +05:30 is 04:00 UTC: on it.
    india = {"starts_at": f"{day}T09:30:00+05:30", "ends_at": f"{day}T10:30:00+05:30"}
    assert admin.post(url, json=india).status_code == 201


def test_activating_ahead_of_time_holds_from_now(gw: LiveServer, admin: httpx.Client) -> None:
    url = "/api/v1/gateway/reservations"
    between = admin.post(url, json=window(hours_from_now=2)).json()
    admin.post(f"{url}/{between['id']}/approve")
    later = admin.post(url, json=window(hours_from_now=30)).json()
    # Started now, it would overlap the approved one in between.
    refused = admin.post(f"{url}/{later['id']}/activate")
    assert refused.status_code == 409
    assert "overlaps" in refused.json()["error"]["message"]
    soon = admin.post(url, json=window(hours_from_now=1)).json()
    before = utcnow()
    active = admin.post(f"{url}/{soon['id']}/activate").json()
    assert active["state"] == "active"
    assert before - timedelta(seconds=5) <= datetime.fromisoformat(active["starts_at"]) <= utcnow()


def test_the_tick_never_activates_a_second_reservation(gw: LiveServer, admin: httpx.Client) -> None:
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    url = "/api/v1/gateway/reservations"
    first = admin.post(url, json=window(hours_from_now=1, length_min=180)).json()
    admin.post(f"{url}/{first['id']}/activate")
    # One that was approved for a window the active one now covers (in a database that
    # holds such rows): it waits rather than being active beside it.
    second = admin.post(url, json=window(hours_from_now=5, length_min=120)).json()
    assert admin.post(f"{url}/{second['id']}/approve").status_code == 200
    # It has begun, inside the active one's window.
    gw.call(shift(gw.core.db, second["id"], 5))  # type: ignore[union-attr]
    gw.call(gateway.reservations.tick())
    states = {r["id"]: r["state"] for r in admin.get(url).json()}
    assert states == {first["id"]: "active", second["id"]: "approved"}
    assert gateway.reservations.active.id == first["id"]


def test_a_request_queued_before_a_reservation_began_is_held_to_it(
    gw: LiveServer, admin: httpx.Client
) -> None:
    admin.patch("/api/v1/gateway/models/slow", json={"parallel": 1})
    holder_key = new_key(admin, "holder")
    other_key = new_key(admin, "other")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=other_key, max_retries=0)
    words = " ".join(f"w{i}" for i in range(20))  # 1 s of stream at 50 ms per chunk
    results: dict[str, int] = {}

    def queued() -> None:
        try:
            client.chat.completions.create(
                model="slow", messages=[{"role": "user", "content": "x"}]
            )
            results["queued"] = 200
        except openai.APIStatusError as exc:
            results["queued"] = exc.status_code

    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": words}], stream=True
    )
    next(iter(stream))  # it holds the one slot
    waiter = threading.Thread(target=queued)
    waiter.start()
    eventually(lambda: gateway.scheduler.pools["slow"].depth, 1)
    reservation = admin.post(
        "/api/v1/gateway/reservations", json={**window(), "user": "holder"}
    ).json()
    assert admin.post(f"/api/v1/gateway/reservations/{reservation['id']}/activate").status_code == (
        200
    )
    for _ in stream:
        pass
    waiter.join()
    assert results == {"queued": 503}
    eventually(lambda: gateway.scheduler.pools["slow"].in_use, 0)
    holder = openai.OpenAI(base_url=gw.url + "/v1", api_key=holder_key, max_retries=0)
    holder.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}])


def test_two_overlapping_reservations_are_never_both_approved(tmp_path: Path, db_url: str) -> None:
    """Approved at the same moment, through one replica or several: each approval's overlap
    check must see the other's (before, both were approved in 9 of 10 tries on PostgreSQL)."""
    admin_principal = Principal(
        user_id=None,
        username="admin",
        role="admin",
        permissions=permissions_for_role("admin"),
        method="service",
    )
    with (
        live_server(
            tmp_path / "data", database_url=db_url, secrets_kek=secrets.token_hex(32)
        ) as server,
        server.client(server.admin_key) as admin,
    ):
        service = server.app.state.gateway.reservations  # type: ignore[union-attr]

        async def approve_both(ids: list[str]) -> list[object]:
            return await asyncio.gather(
                *(service.transition(rid, "approve", admin_principal, admin=True) for rid in ids),
                return_exceptions=True,
            )

        for i in range(5):
            same = window(hours_from_now=2 + 3 * i)
            ids = [admin.post("/api/v1/gateway/reservations", json=same).json()["id"] for _ in "ab"]
            outcomes = server.call(approve_both(ids))
            refused = [o for o in outcomes if isinstance(o, Conflict)]
            assert len(refused) == 1, outcomes


def test_a_reservation_is_bounded_in_length_and_in_time(
    gw: LiveServer, admin: httpx.Client
) -> None:
    url = "/api/v1/gateway/reservations"
    days = reservations.MAX_LENGTH.days
    too_long = admin.post(url, json=window(length_min=(24 * days + 1) * 60))
    assert too_long.status_code == 400
    assert f"at most {days} days" in too_long.json()["error"]["message"]
    assert admin.post(url, json=window(length_min=24 * days * 60)).status_code == 201
    start = window()["starts_at"]
    # Past the last moment a date can hold once in UTC: 400, not a crash.
    for body in (
        {"starts_at": start, "ends_at": "9999-12-31T23:30:00-05:00"},
        {"starts_at": "0001-01-01T00:00:00+05:00", "ends_at": start},
    ):
        refused = admin.post(url, json=body)
        assert refused.status_code == 400, refused.text
        assert "between the years 1 and 9999" in refused.json()["error"]["message"]
    forever = admin.post(url, json={"starts_at": start, "ends_at": "9999-12-31T23:30:00Z"})
    assert forever.status_code == 400
