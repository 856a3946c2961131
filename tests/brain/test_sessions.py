"""Chat sessions end: their owner (or an admin) deletes one, and sessions idle past
``LEGATOR_BRAIN_SESSION_RETENTION_DAYS`` are deleted by the retention task. Real server, real
SQLite, the scripted LLM; whole-fleet chats, so no probe is needed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from legator.brain.models import ChatSession
from legator.core.db.base import utcnow
from tests.brain.llm_server import ScriptedLLM
from tests.brain.test_credentials import bearer, operator
from tests.support import LiveServer, eventually, live_server

LISTED = "/api/v1/probes/all/chat/sessions"  # whole-fleet chats' target is "all"


@pytest.fixture
def server(tmp_path: Path, llm: ScriptedLLM) -> Iterator[LiveServer]:
    with live_server(
        tmp_path / "data",
        llm_provider="openai",
        llm_model="scripted-model",
        llm_api_key="sk-test",
        llm_base_url=f"{llm.url}/v1",
        brain_session_retention_days=90,
    ) as live:
        yield live


@pytest.fixture
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(server.admin_key) as client:
        yield client


def _chat(client: httpx.Client, llm: ScriptedLLM, message: str) -> str:
    llm.script = [{"text": f"answer to {message}"}]
    sent = client.post("/api/v1/fleet/chat", json={"message": message})
    assert sent.status_code == 200, sent.text
    return str(sent.json()["session_id"])


def _listed(client: httpx.Client) -> list[str]:
    return [row["id"] for row in client.get(LISTED).json()]


def test_a_session_is_deleted_by_its_owner_or_an_admin_and_no_one_else(
    server: LiveServer, admin: httpx.Client, llm: ScriptedLLM
) -> None:
    """There was no way to delete a chat session: each kept its history for good."""
    key = operator(admin, "olga")
    with server.client(key["key"]) as olga:
        admins = _chat(admin, llm, "mine")
        first, second = _chat(olga, llm, "one"), _chat(olga, llm, "two")

        # Someone else's session is not found, not refused: its existence is not theirs.
        assert olga.delete(f"/api/v1/brain/sessions/{admins}").status_code == 404
        assert _listed(admin) == [admins]

        assert olga.delete(f"/api/v1/brain/sessions/{first}").status_code == 204
        assert _listed(olga) == [second]
        assert olga.delete(f"/api/v1/brain/sessions/{first}").status_code == 404
        continued = olga.post("/api/v1/fleet/chat", json={"message": "on", "session_id": first})
        assert continued.status_code == 404, continued.text

        assert admin.delete(f"/api/v1/brain/sessions/{second}").status_code == 204
        assert _listed(olga) == []
    events = admin.get("/api/v1/audit", params={"action": "brain.session.delete"}).json()
    deleted = {(e["actor"], e["target"], e["details"]["owner"]) for e in events["events"]}
    assert deleted == {("olga", first, "olga"), ("admin", second, "olga")}, deleted
    assert _listed(admin) == [admins]


def test_a_session_is_deleted_only_with_fleet_read(
    server: LiveServer, admin: httpx.Client, llm: ScriptedLLM
) -> None:
    session_id = _chat(admin, llm, "kept")
    key = operator(admin, "narrow", scopes=["gateway:infer"])
    gone = httpx.delete(
        f"{server.url}/api/v1/brain/sessions/{session_id}", headers=bearer(key), timeout=30
    )
    assert gone.status_code == 403, gone.text
    assert _listed(admin) == [session_id]


def test_sessions_idle_past_the_retention_are_deleted(
    server: LiveServer, admin: httpx.Client, llm: ScriptedLLM
) -> None:
    """Sessions idle (not updated) for more than 90 days go at the retention task's next run
    (at start, then hourly); the others stay."""
    idle, recent = _chat(admin, llm, "old"), _chat(admin, llm, "new")

    async def backdate() -> None:
        assert server.core is not None
        async with server.core.db.write() as session:
            await session.execute(
                update(ChatSession)
                .where(ChatSession.id == idle)
                .values(updated_at=utcnow() - timedelta(days=91))
            )

    server.call(backdate())
    assert sorted(_listed(admin)) == sorted([idle, recent])
    server.restart()
    eventually(lambda: _listed(admin), [recent], timeout=30)
