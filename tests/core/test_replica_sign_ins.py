"""Sign-in limits hold across replicas: a guesser behind a balancer gets them once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from legator.core.auth.attempts import client_key
from tests.support import LiveServer, cluster_settings, replica_pair

pytestmark = pytest.mark.postgres


def _guess(server: LiveServer) -> httpx.Response:
    with server.client() as anon:
        body = {"username": "admin", "password": "not-the-password"}
        return anon.post("/api/v1/auth/login", json=body)


def _attempts_seen(server: LiveServer) -> int:
    assert server.core is not None
    throttle = server.core.auth._sign_ins  # what the replica has heard
    return throttle._accounts.used(f"{client_key('127.0.0.1')}|admin")


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
