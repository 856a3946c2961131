"""The audit trail: sanitised, filtered, paginated, exported and hash-chained."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import httpx
from sqlalchemy import update

from legator.core.audit.models import AuditEvent
from legator.core.db import Database
from tests.support import LiveServer, live_server

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


def test_verify_without_key_says_so(api: httpx.Client) -> None:
    report = api.get("/api/v1/audit/verify").json()
    assert report["chained"] is False
    assert "LEGATOR_AUDIT_CHAIN_KEY" in report["message"]
