"""A backend's usage counts are untrusted input: one that miscounts (a number too large for
the column, a string) must neither fail the request nor stop usage from being written, on
PostgreSQL, whose INTEGER columns hold 32 bits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from legator.gateway.models import GatewayUsage
from tests.gateway.conftest import register
from tests.gateway.scripted_upstream import ScriptedUpstream
from tests.support import LiveServer, live_server


@pytest.fixture
def pg_gw(tmp_path: Path, pg_url: str, upstream: ScriptedUpstream) -> Iterator[LiveServer]:
    with live_server(tmp_path / "data", database_url=pg_url, secrets_kek="ab" * 32) as server:
        with server.client(server.admin_key) as api:
            for mode in ("echo", "badusage"):
                register(api, mode, upstream.url, upstream_model=mode)
        yield server


def rows(gw: LiveServer) -> list[tuple[str, int, int, int]]:
    gw.call(gw.app.state.gateway.recorder.flush())  # type: ignore[union-attr]

    async def read() -> list[tuple[str, int, int, int]]:
        columns = (
            GatewayUsage.model_id,
            GatewayUsage.status,
            GatewayUsage.input_tokens,
            GatewayUsage.output_tokens,
        )
        async with gw.core.db.session() as session:  # type: ignore[union-attr]
            result = await session.execute(select(*columns).order_by(GatewayUsage.id))
            return [tuple(row) for row in result.all()]  # type: ignore[misc]

    return gw.call(read())


def test_a_backend_that_miscounts_usage_loses_no_row(pg_gw: LiveServer) -> None:
    messages = [{"role": "user", "content": "one two three"}]
    with pg_gw.client(pg_gw.admin_key) as api:
        plain = api.post("/v1/chat/completions", json={"model": "badusage", "messages": messages})
        assert plain.status_code == 200, plain.text
        body = {"model": "badusage", "messages": messages, "stream": True}
        with api.stream("POST", "/v1/chat/completions", json=body) as streamed:
            assert streamed.status_code == 200
            assert streamed.read().endswith(b"data: [DONE]\n\n")
        anthropic = api.post(
            "/v1/messages", json={"model": "badusage", "max_tokens": 16, "messages": messages}
        )
        assert anthropic.status_code == 200, anthropic.text
        assert (
            api.post(
                "/v1/chat/completions", json={"model": "echo", "messages": messages}
            ).status_code
            == 200
        )
    written = rows(pg_gw)
    assert [(model, status) for model, status, _, _ in written] == [
        ("badusage", 200),
        ("badusage", 200),
        ("badusage", 200),
        ("echo", 200),
    ]
    for _, _, tokens_in, tokens_out in written[:3]:
        assert 0 <= tokens_in < 2**31 and 0 <= tokens_out < 2**31
    with httpx.Client(base_url=pg_gw.url) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
