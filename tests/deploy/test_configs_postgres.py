"""Configuration versions on PostgreSQL, where concurrent saves really race."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import live_server


@pytest.mark.postgres
def test_concurrent_saves_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    # No data dir, as on a PostgreSQL deployment: the secrets live in the database too.
    kek = secrets.token_hex(32)
    with (
        live_server(None, database_url=pg_url, secrets_kek=kek) as server,
        server.client(server.admin_key) as api,
    ):

        def save(i: int) -> int:
            body = {"spec": {"services": {"redis": {"port": 21000 + i}}}}
            response = api.post("/api/v1/deploy/configs", json=body)
            assert response.status_code == 201, response.text
            return int(response.json()["version"])

        with ThreadPoolExecutor(max_workers=4) as pool:
            versions = sorted(pool.map(save, range(8)))
        assert versions == list(range(1, 9))
        latest = api.get("/api/v1/deploy/rendered/latest/manifest.json").json()
        assert latest["version"] == 8
