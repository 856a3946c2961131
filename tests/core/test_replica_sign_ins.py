"""Credentials across replicas: a guesser behind a balancer gets the sign-in limits once, and
a key revoked through one replica stops working on the others at once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support import LiveServer, cluster_settings, replica_pair

pytestmark = pytest.mark.postgres


def _guess(server: LiveServer) -> httpx.Response:
    with server.client() as anon:
        body = {"username": "admin", "password": "not-the-password"}
        return anon.post("/api/v1/auth/login", json=body)


def _attempts_seen(server: LiveServer) -> int:
    assert server.core is not None
    throttle = server.core.auth._sign_ins  # what the replica finds counted
    return server.call(throttle.account_attempts("127.0.0.1", "admin"))


def test_guesses_through_one_replica_count_on_the_other(pg_url: str, tmp_path: Path) -> None:
    with replica_pair(tmp_path, cluster_settings(pg_url)) as (a, b):
        assert [_guess(a).status_code for _ in range(6)] == [401] * 6
        deadline = time.monotonic() + 10
        while _attempts_seen(b) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [_guess(b).status_code for _ in range(5)] == [401] * 4 + [429]
        while _attempts_seen(a) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _guess(a).status_code == 429


def test_a_key_revoked_through_one_replica_is_refused_by_the_other(
    pg_url: str, tmp_path: Path
) -> None:
    with replica_pair(tmp_path, cluster_settings(pg_url)) as (a, b), a.client(a.admin_key) as api:
        key = api.post("/api/v1/keys", json={"name": "short-lived"}).json()
        with b.client(key["key"]) as through_b:
            assert through_b.get("/api/v1/me").status_code == 200  # verified and cached on b
            assert api.delete(f"/api/v1/keys/{key['id']}").status_code == 200
            # Well within the 5 s b would otherwise keep it.
            deadline = time.monotonic() + 1.5
            while (status := through_b.get("/api/v1/me").status_code) == 200:
                assert time.monotonic() < deadline, "b still takes the revoked key"
                time.sleep(0.02)
            assert status == 401
