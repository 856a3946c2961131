"""Model Dock: profiles with keys in the secrets store (masked everywhere), per-feature
routing with the environment as fallback, usage per profile and feature."""

from __future__ import annotations

import sqlite3

import httpx
import pytest

from tests.brain.helpers import record_clients
from tests.brain.llm_server import ScriptedLLM
from tests.support import LiveServer

KEY = "sk-dock-secret-0123456789"


def test_profiles_route_features_and_keep_keys_secret(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM, provider: str
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("dock-a")
    base_url = f"{llm.url}/v1" if provider == "openai" else llm.url
    created = admin.post(
        "/api/v1/brain/profiles",
        json={
            "name": "scripted",
            "provider": provider,
            "model": "dock-model",
            "base_url": base_url,
            "api_key": KEY,
        },
    )
    assert created.status_code == 201, created.text
    profile = created.json()
    assert profile["api_key"] == "sk-…6789" and profile["features"] == []
    assert admin.post("/api/v1/brain/profiles", json={**created.json()}).status_code == 422
    bad = admin.post(
        "/api/v1/brain/profiles",
        json={"name": "x", "provider": "openai", "model": "m", "base_url": "ftp://x"},
    )
    assert bad.status_code == 422 and "base_url" in bad.text
    activated = admin.post(
        f"/api/v1/brain/profiles/{profile['id']}/activate", json={"features": ["task"]}
    )
    assert activated.json()["features"] == ["task"]

    llm.script = [{"text": "done by the dock"}, {"text": "done by the environment"}]
    task = admin.post(f"/api/v1/probes/{probe.probe_id}/task", json={"goal": "x"}).json()
    assert task["profile"] == "scripted" and task["model"] == "dock-model"
    assert llm.keys[-1] == KEY and llm.requests[-1]["model"] == "dock-model"
    chat = admin.post(f"/api/v1/probes/{probe.probe_id}/chat", json={"message": "y"}).json()
    assert chat["answer"] == "done by the environment"
    assert llm.keys[-1] == "sk-test"  # probe chat is not routed: the LEGATOR_LLM_* fallback

    usage = {(u["profile"], u["feature"]): u for u in admin.get("/api/v1/brain/usage").json()}
    assert usage[("scripted", "task")]["requests"] == 1
    assert usage[("env", "probe_chat")]["requests"] == 1
    assert usage[("scripted", "task")]["output_tokens"] > 0

    # The key is in the secrets store, encrypted, and in no response or audit event.
    listing = admin.get("/api/v1/brain/profiles").text
    audit = admin.get("/api/v1/audit", params={"limit": 1000}).text
    assert KEY not in listing and KEY not in audit
    assert KEY.encode() not in b"".join(
        p.read_bytes()
        for p in (fleet_server.data_dir or fleet_server.core.settings.data_dir).rglob("*")
        if p.is_file()
    )

    patched = admin.patch(
        f"/api/v1/brain/profiles/{profile['id']}", json={"api_key": "sk-rotated-key-99998888"}
    )
    assert patched.json()["api_key"] == "sk-…8888"
    llm.script = [{"text": "rotated"}]
    admin.post(f"/api/v1/probes/{probe.probe_id}/task", json={"goal": "x"})
    assert llm.keys[-1] == "sk-rotated-key-99998888"

    assert admin.delete(f"/api/v1/brain/profiles/{profile['id']}").status_code == 204
    assert admin.get("/api/v1/brain/profiles").json() == []
    assert admin.delete(f"/api/v1/brain/profiles/{profile['id']}").status_code == 404


def test_a_profile_change_reaches_the_next_call_and_closes_the_old_client(
    fleet_server: LiveServer,
    admin: httpx.Client,
    llm: ScriptedLLM,
    provider: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = record_clients(monkeypatch)
    base_url = f"{llm.url}/v1" if provider == "openai" else llm.url
    profile = admin.post(
        "/api/v1/brain/profiles",
        json={
            "name": "p",
            "provider": provider,
            "model": "m",
            "base_url": base_url,
            "api_key": KEY,
        },
    ).json()
    admin.post(
        f"/api/v1/brain/profiles/{profile['id']}/activate", json={"features": ["fleet_chat"]}
    )

    def chat() -> None:
        llm.script = [{"text": "ok"}]
        response = admin.post("/api/v1/fleet/chat", json={"message": "x"})
        assert response.status_code == 200, response.text

    chat()
    chat()
    assert llm.keys == [KEY, KEY] and len(built) == 1
    assert llm.connections[0] == llm.connections[1]  # one client, its connection kept alive

    rotated = "sk-rotated-key-99998888"
    admin.patch(f"/api/v1/brain/profiles/{profile['id']}", json={"api_key": rotated})
    chat()
    # The new key, on a new client (and connection); the old key's client is closed.
    assert llm.keys[-1] == rotated and len(built) == 2
    assert llm.connections[-1] != llm.connections[0]
    assert built[0].is_closed() and not built[1].is_closed()

    admin.patch(f"/api/v1/brain/profiles/{profile['id']}", json={"model": "m2"})
    chat()
    assert llm.requests[-1]["model"] == "m2" and llm.keys[-1] == rotated
    assert len(built) == 2  # the model is per request: the same client serves it

    assert admin.delete(f"/api/v1/brain/profiles/{profile['id']}").status_code == 204
    chat()  # back to the LEGATOR_LLM_* settings; the deleted profile's client is closed
    assert llm.keys[-1] == "sk-test" and len(built) == 3
    assert built[1].is_closed() and not built[2].is_closed()


def test_a_profiles_url_credentials_are_masked_and_kept(
    fleet_server: LiveServer, admin: httpx.Client
) -> None:
    url = "https://svc:PROXYPASS123@llm.example/v1"
    body = {"name": "proxied", "provider": "openai", "model": "m", "base_url": url, "api_key": KEY}
    created = admin.post("/api/v1/brain/profiles", json=body).json()
    shown = "https://svc:***@llm.example/v1"
    assert created["base_url"] == shown
    user = {"username": "vic", "password": "correct horse battery", "role": "viewer"}
    assert admin.post("/api/v1/users", json=user).status_code == 201
    viewer_key = admin.post("/api/v1/keys", json={"name": "v", "user": "vic"}).json()["key"]
    with fleet_server.client(viewer_key) as viewer:
        listed = viewer.get("/api/v1/brain/profiles")
    assert listed.status_code == 200 and "PROXYPASS123" not in listed.text
    # The URL sent back as shown keeps the real one; a new one replaces it.
    patch = {"base_url": shown, "model": "m2"}
    assert admin.patch(f"/api/v1/brain/profiles/{created['id']}", json=patch).status_code == 200
    assert fleet_server.data_dir is not None
    with sqlite3.connect(fleet_server.data_dir / "legator.db") as db:
        query = "SELECT base_url, model FROM brain_model_profiles WHERE id = ?"
        assert db.execute(query, (created["id"],)).fetchone() == (url, "m2")
    patch = {"base_url": "https://llm.example/v2"}
    assert (
        admin.patch(f"/api/v1/brain/profiles/{created['id']}", json=patch).json()["base_url"]
        == "https://llm.example/v2"
    )
    # A key in the query string is a credential too.
    patch = {"base_url": "https://llm.example/v3?api-version=1&key=QUERYSECRET9"}
    changed = admin.patch(f"/api/v1/brain/profiles/{created['id']}", json=patch).json()
    assert changed["base_url"] == "https://llm.example/v3?api-version=***&key=***"
    with fleet_server.client(viewer_key) as viewer:
        assert "QUERYSECRET9" not in viewer.get("/api/v1/brain/profiles").text
