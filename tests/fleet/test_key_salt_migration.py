"""The upgrade that salts probe signing keys: a probe enrolled before it keeps the key its
probe.yaml holds, and the hub signs for it with exactly that key."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from sqlalchemy import text

from legator.core.db import Database
from legator.core.db.migrate import import_all_models, upgrade
from legator.fleet.hub import Hub

MASTER = bytes(range(32))
BEFORE = "0013_replica_url"


async def test_a_probe_enrolled_before_the_upgrade_keeps_its_key(tmp_path: Path) -> None:
    import_all_models()
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        await upgrade(db, BEFORE)
        async with db.write() as session:
            await session.execute(
                text(
                    "INSERT INTO fleet_probes (id, hostname, os, arch, version, tags, policy_id,"
                    " key_hash, status, registered_at, metrics, inventory) VALUES ('prb-0011aabb',"
                    " 'old', 'linux', 'x86_64', '0.1', '[]', 'observe-only', :hash, 'offline',"
                    " CURRENT_TIMESTAMP, '{}', '{}')"
                ),
                {"hash": "ab" * 32},
            )
        await upgrade(db)
        async with db.session() as session:
            row = (
                await session.execute(text("SELECT key_salt, pending_key_salt FROM fleet_probes"))
            ).one()
        assert tuple(row) == ("", None)

        async def salts(probe_id: str) -> str | None:
            async with db.session() as session:
                return await session.scalar(
                    text("SELECT key_salt FROM fleet_probes WHERE id = :id"), {"id": probe_id}
                )

        given = hmac.new(MASTER, b"legator-probe-signing|prb-0011aabb", hashlib.sha256)
        assert await Hub(MASTER, salts).current_key("prb-0011aabb") == given.hexdigest()
    finally:
        await db.dispose()
