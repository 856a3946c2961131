"""The audit chain's open edges: a key too short to be one, offline writes beside the server,
and the newest events deleted (which a chain alone cannot notice)."""

from __future__ import annotations

import io
import json
import subprocess
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select

from legator.core.audit.models import AuditEvent
from legator.core.audit.service import AuditService
from legator.core.config import ConfigError, load_settings
from legator.core.db import Database
from legator.core.db.migrate import upgrade
from tests.support import live_server, one_line_error, run_cli

KEY = "review-chain-key-0123456789"
KEK = "ab" * 32  # PostgreSQL needs the secrets store's key set
UNSET = {"LEGATOR_DATA_DIR": "", "LEGATOR_DATABASE_URL": "", "LEGATOR_AUDIT_CHAIN_KEY": ""}


def _legator(*args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli("legator", *args, env={**UNSET, **env}, input=input)


def _verify(api: httpx.Client, head: str | None = None) -> dict[str, Any]:
    response = api.get("/api/v1/audit/verify", params={"head": head} if head else {})
    assert response.status_code == 200, response.text
    return dict(response.json())


# ----- the key's length ------------------------------------------------------------------


def test_a_chain_key_too_short_to_resist_guessing_stops_start_up(tmp_path: Path) -> None:
    for short in ("k", "Zq9-short-key15", " " * 20):
        with pytest.raises(ConfigError) as refused:
            load_settings(audit_chain_key=short)
        message = str(refused.value)
        assert message.startswith("LEGATOR_AUDIT_CHAIN_KEY: "), message
        assert "16 characters" in message and (short.strip() or "@@") not in message
    assert load_settings(audit_chain_key="k" * 16).audit_chain_key is not None
    # The CLI stops on one line naming the variable, without echoing the value.
    done = _legator(
        "db", "current", LEGATOR_DATA_DIR=str(tmp_path), LEGATOR_AUDIT_CHAIN_KEY="Zq9-short"
    )
    line = one_line_error(done, 2)
    assert "LEGATOR_AUDIT_CHAIN_KEY" in line and "Zq9-short" not in done.stderr + done.stdout


# ----- offline writes -------------------------------------------------------------------


def test_offline_writes_join_the_chain_or_refuse_to_write(tmp_path: Path, db_url: str) -> None:
    """The offline CLI writes audit events beside the server; run from a shell without the
    server's key (or with another) it must not leave events that break the chain."""
    with (
        live_server(
            tmp_path / "d", database_url=db_url, audit_chain_key=KEY, secrets_kek=KEK
        ) as server,
        server.client(server.admin_key) as api,
    ):
        assert api.post("/api/v1/keys", json={"name": "before"}).status_code == 201
        assert _verify(api)["ok"] is True
        server.stop()
        offline = {"LEGATOR_DATABASE_URL": db_url, "LEGATOR_SECRETS_KEK": KEK}
        without = _legator(
            "users", "create", "nokey", "--password-stdin", input="p" * 16, **offline
        )
        other = _legator(
            "users",
            "create",
            "otherkey",
            "--password-stdin",
            input="p" * 16,
            **offline,
            LEGATOR_AUDIT_CHAIN_KEY="another-chain-key-0123456789",
        )
        right = _legator(
            "users",
            "create",
            "rightkey",
            "--password-stdin",
            input="p" * 16,
            **offline,
            LEGATOR_AUDIT_CHAIN_KEY=KEY,
        )
        listing = _legator("users", "list", "--json", **offline)  # reads need no key
        server.start()
        report = _verify(api)
        assert report["ok"] is True, report
        names = {user["username"] for user in api.get("/api/v1/users").json()}
        events = api.get("/api/v1/audit", params={"actor": "cli"}).json()["events"]
    assert "LEGATOR_AUDIT_CHAIN_KEY: not set" in one_line_error(without, 2)
    assert "LEGATOR_AUDIT_CHAIN_KEY: not the key" in one_line_error(other, 2)
    assert right.returncode == 0, right.stderr
    assert listing.returncode == 0 and "rightkey" in listing.stdout, listing.stderr
    # A refused command changed nothing: no user without its audit event.
    assert "rightkey" in names and not names & {"nokey", "otherkey"}
    assert [event["target"] for event in events] == ["user:rightkey"]
    assert events[0]["hash"] and report["head_event"] == events[0]["id"]


def test_an_offline_write_to_an_unchained_log_needs_no_key(tmp_path: Path) -> None:
    with live_server(tmp_path / "d") as server, server.client(server.admin_key) as api:
        server.stop()
        done = _legator(
            "users",
            "create",
            "plain",
            "--password-stdin",
            input="p" * 16,
            LEGATOR_DATA_DIR=str(tmp_path / "d"),
        )
        server.start()
        assert done.returncode == 0, done.stderr
        assert api.get("/api/v1/audit", params={"actor": "cli"}).json()["events"]


# ----- deleting the newest events --------------------------------------------------------


async def _delete_newest(db: Database, count: int) -> None:
    """What someone with the database but not the key can do: cut off the log's end."""
    async with db.write() as session:
        newest = select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).limit(count)
        seqs = list((await session.scalars(newest)).all())
        await session.execute(delete(AuditEvent).where(AuditEvent.seq.in_(seqs)))


def test_a_head_kept_elsewhere_reveals_deleted_newest_events(tmp_path: Path, db_url: str) -> None:
    with (
        live_server(
            tmp_path / "d", database_url=db_url, audit_chain_key=KEY, secrets_kek=KEK
        ) as server,
        server.client(server.admin_key) as api,
    ):
        for i in range(4):
            assert api.post("/api/v1/keys", json={"name": f"k{i}"}).status_code == 201
        saved = _verify(api)
        assert saved["ok"] and saved["head"] and saved["head_event"], saved
        newest = api.get("/api/v1/audit", params={"limit": 1}).json()["events"][0]
        assert saved["head_event"] == newest["id"] and saved["head"].startswith(newest["hash"])
        # Later events leave an earlier head in place.
        assert api.post("/api/v1/keys", json={"name": "later"}).status_code == 201
        assert "still in the log" in _verify(api, saved["head"])["message"]

        assert server.core is not None
        server.call(_delete_newest(server.core.db, 3))
        # The chain alone cannot tell: what is left still links up.
        assert _verify(api)["ok"] is True
        cut = _verify(api, saved["head"])
        assert cut["ok"] is False and "deleted from the end of the log" in cut["message"], cut

        # Nor does writing on cover it (SQLite even hands the freed positions out again).
        for i in range(3):
            assert api.post("/api/v1/keys", json={"name": f"after{i}"}).status_code == 201
        covered = _verify(api, saved["head"])
        assert covered["ok"] is False and "deleted from the end" in covered["message"], covered

        bundle = api.get("/api/v1/audit/export/bundle")
        with zipfile.ZipFile(io.BytesIO(bundle.content)) as archive:
            report = json.loads(archive.read("verification.json"))
        assert report["head"] == _verify(api)["head"] is not None

        for bad_head in ("not-a-hash@2026-01-01T00:00:00Z", "a" * 64 + "@yesterday"):
            bad = api.get("/api/v1/audit/verify", params={"head": bad_head})
            assert bad.status_code == 400 and "HASH@TIME" in bad.text, bad.text


def test_a_head_a_purge_took_is_no_break(tmp_path: Path) -> None:
    with (
        live_server(tmp_path / "d", audit_chain_key=KEY) as server,
        server.client(server.admin_key) as api,
    ):
        assert api.post("/api/v1/keys", json={"name": "k"}).status_code == 201
        saved = _verify(api)["head"]
        time.sleep(0.01)
        cutoff = datetime.now(UTC).isoformat()
        assert api.delete("/api/v1/audit", params={"older_than": cutoff}).status_code == 200
        report = _verify(api, saved)
        assert report["ok"] is True and "purged since" in report["message"], report

        # A purge before the head excuses nothing, even one that cut up to a future time.
        future = "2999-01-01T00:00:00Z"
        assert api.delete("/api/v1/audit", params={"older_than": future}).status_code == 200
        for i in range(2):
            assert api.post("/api/v1/keys", json={"name": f"k{i}"}).status_code == 201
        later = _verify(api)["head"]
        assert server.core is not None
        server.call(_delete_newest(server.core.db, 1))
        cut = _verify(api, later)
    assert cut["ok"] is False and "no purge took it" in cut["message"], cut


async def test_an_emptied_log_fails_a_head(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/a.db")
    try:
        await upgrade(db)
        audit = AuditService(db, KEY.encode())
        for i in range(2):
            await audit.log(actor="t", action="test.event", target=str(i))
        head = (await audit.verify()).head
        assert head is not None
        await _delete_newest(db, 2)
        report = await audit.verify(head)
        assert (report.ok, report.checked) == (False, 0), report
        with pytest.raises(ValueError, match="HASH@TIME"):  # InvalidHead
            await audit.verify("a" * 64 + "@2026-01-01T00:00:00")  # no time zone
    finally:
        await db.dispose()


def test_a_server_started_with_another_key_says_so(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Not fatal (a lost key must not take the control plane down), but said at start-up:
    every event from then on fails verification."""
    with live_server(tmp_path / "d", audit_chain_key=KEY):
        pass
    capfd.readouterr()
    with live_server(tmp_path / "d", audit_chain_key=KEY):
        pass
    assert "audit chain key does not fit" not in capfd.readouterr().out
    with live_server(tmp_path / "d", audit_chain_key="another-chain-key-0123456789"):
        pass
    out = capfd.readouterr().out
    assert "the audit chain key does not fit the audit log" in out, out
    assert "not the key the audit log is chained with" in out and KEY not in out
