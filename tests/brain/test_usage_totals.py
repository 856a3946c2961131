"""Usage per profile and feature is counted exactly, also when turns end at the same time on
PostgreSQL, and holds totals past 32 bits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LiveServer, live_server


@pytest.fixture
def pg_server(tmp_path: Path, pg_url: str) -> Iterator[LiveServer]:
    with live_server(tmp_path / "data", database_url=pg_url, secrets_kek="ab" * 32) as server:
        yield server


def test_concurrent_turns_are_all_counted_and_totals_pass_32_bits(pg_server: LiveServer) -> None:
    dock = pg_server.app.state.brain.dock  # type: ignore[union-attr]

    async def turns() -> None:
        await asyncio.gather(*(dock.account("env", "task", 10, 5, 1) for _ in range(40)))
        await dock.account("env", "task", 3_000_000_000, 2_500_000_000, 1)

    pg_server.call(turns())
    with pg_server.client(pg_server.admin_key) as admin:
        usage = admin.get("/api/v1/brain/usage").json()
    assert usage == [
        {
            "profile": "env",
            "feature": "task",
            "requests": 41,
            "input_tokens": 3_000_000_400,
            "output_tokens": 2_500_000_200,
        }
    ]
