"""``legator secrets import-sqlite`` with the control plane's real audit log, on both backends:
each secret copied is audited with it, and an import interrupted half-way leaves each secret
in with its event or neither."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from legator.core.audit.schemas import AuditEventOut
from legator.core.audit.service import AuditFilter, AuditService
from legator.core.config import Settings
from legator.core.db import Database
from legator.core.db.migrate import upgrade
from legator.secrets.crypto import load_key_file
from legator.secrets.importing import (
    IMPORT_ACTION,
    SUMMARY_ACTION,
    VersionsOutOfRange,
    open_sqlite_import,
)
from legator.secrets.location import open_store
from legator.secrets.store import MAX_VERSION, ImportReport, SecretStore, SqlStore
from tests.support import run_cli


@dataclass
class Plane:
    """A control plane's settings and its audit log (the real one, hash chain included)."""

    settings: Settings
    audit: AuditService

    def store(self) -> SqlStore:
        return open_store(self.settings)[0]

    async def run_import(self, old: Path) -> ImportReport:
        """What ``legator secrets import-sqlite`` does: open, run into this audit log, close."""
        job = open_sqlite_import(self.settings, old, None)
        try:
            return await job.run(self.audit)
        finally:
            job.close()

    async def events(self, action: str) -> list[AuditEventOut]:
        found, _ = await self.audit.query(AuditFilter(action=action), limit=100)
        return sorted(found, key=lambda e: e.target)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "sqlite":
        (tmp_path / "plane").mkdir(mode=0o700)
        return Settings(data_dir=tmp_path / "plane")
    return Settings(
        database_url=request.getfixturevalue("pg_url"), secrets_kek=secrets.token_hex(32)
    )


@pytest.fixture
async def plane(settings: Settings) -> AsyncIterator[Plane]:
    db = Database(settings.effective_database_url)
    await upgrade(db)
    try:
        yield Plane(settings, AuditService(db, b"chain key"))
    finally:
        await db.dispose()


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A SQLite store from before: three secrets, one with a deleted version."""
    directory = tmp_path / "old"
    store = SecretStore(directory / "secrets.db", load_key_file(directory / "keys" / "main.key"))
    for value in (b"pw-1", b"pw-2", b"pw-3"):
        store.put("db/password", value)
    store.activate("db/password", 3)
    store.delete_version("db/password", 2)
    store.put("api/token", b"t0k3n-value")
    store.put("mail/key", b"m41l-value")
    store.close()
    return directory


def details(events: list[AuditEventOut]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(e.actor, e.target, e.details) for e in events]


async def test_each_secret_copied_is_one_audit_event_and_the_import_one_summary(
    plane: Plane, old: Path
) -> None:
    here = plane.store()
    here.put("mail/key", b"m41l-value")  # here already, the same
    here.close()
    report = await plane.run_import(old)
    assert (report.imported, report.unchanged, report.conflicts) == (
        ["api/token", "db/password"],
        ["mail/key"],
        [],
    )
    source = str(old / "secrets.db")
    assert details(await plane.events(IMPORT_ACTION)) == [
        (
            "cli",
            "api/token",
            {"source": source, "versions": [1], "deleted_versions": [], "active_version": 1},
        ),
        (
            "cli",
            "db/password",
            {"source": source, "versions": [1, 3], "deleted_versions": [2], "active_version": 3},
        ),
    ]
    assert details(await plane.events(SUMMARY_ACTION)) == [
        (
            "cli",
            source,
            {"imported": ["api/token", "db/password"], "unchanged": ["mail/key"], "conflicts": []},
        )
    ]
    everything, _ = await plane.audit.query(AuditFilter(action="secrets.*"))
    dumped = json.dumps([e.model_dump(mode="json") for e in everything])
    assert not any(value in dumped for value in ("pw-", "t0k3n", "m41l"))  # never a value
    assert (await plane.audit.verify()).ok


@pytest.mark.parametrize("failing", ["rows", "audit event"])
async def test_an_interrupted_import_leaves_each_secret_with_its_event_or_neither(
    plane: Plane, old: Path, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second secret's write fails half-way (PostgreSQL lost, say): while its rows are
    sealed, or after they are written, when its audit event is recorded."""

    class Lost(Exception):
        pass

    if failing == "rows":
        sealed_versions = SqlStore.sealed_versions

        def sealing(self: SqlStore, secret: Any) -> Any:
            if secret.name == "db/password":
                raise Lost("connection lost")
            return sealed_versions(self, secret)

        monkeypatch.setattr(SqlStore, "sealed_versions", sealing)
    else:
        record = AuditService.record

        async def recording(self: AuditService, session: Any, **fields: Any) -> Any:
            if fields["action"] == IMPORT_ACTION and fields["target"] == "db/password":
                raise Lost("connection lost")
            return await record(self, session, **fields)

        monkeypatch.setattr(AuditService, "record", recording)
    with pytest.raises(Lost):
        await plane.run_import(old)

    here = plane.store()
    assert [(i.name, i.versions) for i in here.list()] == [("api/token", [1])]
    assert [e.target for e in await plane.events(IMPORT_ACTION)] == ["api/token"]
    assert await plane.events(SUMMARY_ACTION) == []  # the import did not finish

    monkeypatch.undo()
    report = await plane.run_import(old)
    assert (report.imported, report.unchanged) == (["db/password", "mail/key"], ["api/token"])
    assert here.get("db/password") == (b"pw-3", 3)
    assert [e.target for e in await plane.events(IMPORT_ACTION)] == [
        "api/token",
        "db/password",
        "mail/key",
    ]
    here.close()
    assert (await plane.audit.verify()).ok


def test_the_cli_audits_each_secret_on_a_sqlite_control_plane(tmp_path: Path, old: Path) -> None:
    """The other path end to end: the store and the audit log in two SQLite files."""
    data_dir = tmp_path / "plane"
    done = run_cli(
        "legator",
        "secrets",
        "import-sqlite",
        str(old),
        "--json",
        env={"LEGATOR_DATA_DIR": str(data_dir)},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imported"] == ["api/token", "db/password", "mail/key"]

    async def audited() -> list[tuple[str, str]]:
        db = Database(Settings(data_dir=data_dir).effective_database_url)
        try:
            found, _ = await AuditService(db).query(AuditFilter(action="secrets.import*"))
        finally:
            await db.dispose()
        return [(e.action, e.target) for e in reversed(found)]

    assert asyncio.run(audited()) == [
        (IMPORT_ACTION, "api/token"),
        (IMPORT_ACTION, "db/password"),
        (IMPORT_ACTION, "mail/key"),
        (SUMMARY_ACTION, str(old / "secrets.db")),
    ]


async def test_versions_beyond_what_the_target_holds_stop_the_import_before_it_copies(
    plane: Plane, old: Path
) -> None:
    """SQLite numbers versions up to 2^63 - 1, the stores here up to 2^31 - 1 (PostgreSQL's
    INTEGER): such a secret is named, with its version, before anything is copied."""
    source = SecretStore(old / "secrets.db", load_key_file(old / "keys" / "main.key"))
    source.create_version("big/secret", MAX_VERSION + 1, b"b1g-value")
    source.create_version("db/password", MAX_VERSION + 5, b"pw-huge")
    source.activate("db/password", 3)
    source.delete_version("db/password", MAX_VERSION + 5)  # deleted, still claimed
    source.close()
    with pytest.raises(VersionsOutOfRange) as refused:
        await plane.run_import(old)
    assert refused.value.message.startswith(
        f"{old / 'secrets.db'}: 'big/secret' version {MAX_VERSION + 1}, "
        f"'db/password' version {MAX_VERSION + 5} above {MAX_VERSION}, "
    )
    assert "nothing was imported" in refused.value.message
    here = plane.store()
    assert here.list() == []
    here.close()
    assert await plane.events(IMPORT_ACTION) == []
