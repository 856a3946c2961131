"""The same fleet flow on PostgreSQL: migrations, enrolment, batched writes, fan-out."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.fleet.e2e.conftest import ProbeProcess, wait_for
from tests.support import live_server


@pytest.mark.postgres
def test_fleet_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    with (
        live_server(
            tmp_path / "data",
            database_url=pg_url,
            secrets_kek=secrets.token_hex(32),
            fleet_flush_interval_s=0.3,
        ) as server,
        server.client(server.admin_key) as admin,
    ):
        probes = []
        try:
            for name in ("pg-a", "pg-b"):
                token = admin.post("/api/v1/tokens").json()["token"]
                probe = ProbeProcess(server, tmp_path / name, tmp_path / f"{name}.log")
                assert probe.init(token, hostname=name, tags="pg").returncode == 0
                probe.start()
                probes.append(probe)
            for probe in probes:
                wait_for(
                    lambda p=probe: admin.get(f"/api/v1/probes/{p.probe_id}").json()["connected"]
                )
            done = admin.post(
                f"/api/v1/probes/{probes[0].probe_id}/command?wait=true", json={"command": "uname"}
            ).json()
            assert done["status"] == "completed" and done["stdout"] == "Linux\n"
            fan = admin.post("/api/v1/fleet/by-tag/pg/command", json={"command": "id"}).json()
            assert fan["targets"] == 2 and all(r["ok"] for r in fan["results"])
            summary = admin.get("/api/v1/fleet/summary").json()
            assert summary["connected"] == 2 and summary["tags"] == {"pg": 2}
        finally:
            for probe in probes:
                probe.stop()
