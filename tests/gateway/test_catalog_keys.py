"""Catalogue admin, the resolution chain, inference keys and their pins, /v1/models scope."""

from __future__ import annotations

from datetime import datetime

import httpx
import openai
import pytest

from tests.gateway.conftest import new_key, register
from tests.gateway.scripted_upstream import ScriptedUpstream
from tests.support import LiveServer


def chat(gw: LiveServer, key: str, model: str) -> str:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "q"}])
    return reply.model  # the upstream echoes the upstream model it was asked for


@pytest.fixture
def catalogue(admin: httpx.Client, upstream: ScriptedUpstream) -> httpx.Client:
    assert (
        admin.post(
            "/api/v1/gateway/categories", json={"name": "code", "description": "coding models"}
        ).status_code
        == 201
    )
    register(admin, "coder-a", upstream.url, upstream_model="echo", categories=["code"])
    register(admin, "coder-b", upstream.url, upstream_model="echo", categories=["code"])
    assert (
        admin.patch(
            "/api/v1/gateway/categories/code", json={"preferred_model": "coder-b"}
        ).status_code
        == 200
    )
    return admin


def test_model_admin_validation(admin: httpx.Client, upstream: ScriptedUpstream) -> None:
    assert admin.post("/api/v1/gateway/models", json={"id": "x"}).status_code == 422
    bad = admin.post("/api/v1/gateway/models", json={"id": "bad id!", "backend_url": upstream.url})
    assert bad.status_code == 422 and "letters" in bad.json()["error"]["message"]
    dup = admin.post("/api/v1/gateway/models", json={"id": "echo", "backend_url": upstream.url})
    assert dup.status_code == 409
    unknown_cat = admin.post(
        "/api/v1/gateway/models",
        json={"id": "y", "backend_url": upstream.url, "categories": ["nope"]},
    )
    assert unknown_cat.status_code == 400
    assert admin.get("/api/v1/gateway/models/nope").status_code == 404
    assert admin.delete("/api/v1/gateway/models/tools").status_code == 204
    assert "tools" not in [m["id"] for m in admin.get("/api/v1/gateway/models").json()]
    backends = admin.get("/api/v1/gateway/backends").json()
    assert {b["model"] for b in backends} == {"echo", "slow", "die", "fail500"}


def test_category_resolution(gw: LiveServer, catalogue: httpx.Client) -> None:
    # A category name as `model` → its preferred model while ready…
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    chat(gw, gw.admin_key, "code")
    assert gateway.scheduler.pools["coder-b"].served == 1
    # …else a ready model of the category.
    catalogue.patch("/api/v1/gateway/models/coder-b", json={"state": "disabled"})
    chat(gw, gw.admin_key, "code")
    assert gateway.scheduler.pools["coder-a"].served == 1
    # None ready: 503, never another model.
    catalogue.patch("/api/v1/gateway/models/coder-a", json={"state": "unavailable"})
    with pytest.raises(openai.InternalServerError) as err:
        chat(gw, gw.admin_key, "code")
    assert err.value.status_code == 503


def test_pinned_keys(gw: LiveServer, catalogue: httpx.Client) -> None:
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    model_key = new_key(catalogue, "alice", model="echo")
    chat(gw, model_key, "slow")  # the pin wins over the request
    assert "slow" not in gateway.scheduler.pools
    listed = openai.OpenAI(base_url=gw.url + "/v1", api_key=model_key).models.list()
    assert [m.id for m in listed.data] == ["echo"]

    cat_key = new_key(catalogue, "bob", category="code")
    listed = openai.OpenAI(base_url=gw.url + "/v1", api_key=cat_key).models.list()
    assert sorted(m.id for m in listed.data) == ["coder-a", "coder-b"]
    chat(gw, cat_key, "echo")  # pinned to the category: never falls through to `echo`
    assert gateway.scheduler.pools["coder-b"].served == 1
    catalogue.patch("/api/v1/gateway/models/coder-b", json={"state": "unavailable"})
    catalogue.patch("/api/v1/gateway/models/coder-a", json={"state": "unavailable"})
    with pytest.raises(openai.InternalServerError) as err:
        chat(gw, cat_key, "echo")
    assert err.value.status_code == 503

    # An unpinned key sees every enabled model.
    free_key = new_key(catalogue, "carol")
    listed = openai.OpenAI(base_url=gw.url + "/v1", api_key=free_key).models.list()
    assert {"echo", "coder-a", "coder-b"} <= {m.id for m in listed.data}


def test_a_category_pin_holds_when_its_preferred_model_leaves_it(
    gw: LiveServer, catalogue: httpx.Client
) -> None:
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    cat_key = new_key(catalogue, "erin", category="code")
    # The preferred model is taken out of the category, or was never in it.
    catalogue.patch("/api/v1/gateway/models/coder-b", json={"categories": []})
    catalogue.patch("/api/v1/gateway/categories/code", json={"preferred_model": "echo"})
    listed = openai.OpenAI(base_url=gw.url + "/v1", api_key=cat_key).models.list()
    assert [m.id for m in listed.data] == ["coder-a"]
    chat(gw, cat_key, "code")
    chat(gw, gw.admin_key, "code")
    assert gateway.scheduler.pools["coder-a"].served == 2
    assert "echo" not in gateway.scheduler.pools and "coder-b" not in gateway.scheduler.pools


def test_inference_keys_self_service(gw: LiveServer, admin: httpx.Client) -> None:
    assert (
        admin.post(
            "/api/v1/users",
            json={"username": "dave", "password": "correct horse battery", "role": "viewer"},
        ).status_code
        == 201
    )
    personal = admin.post("/api/v1/keys", json={"name": "login", "user": "dave"}).json()["key"]
    with gw.client(personal) as dave:
        for days in (0, 366):
            assert (
                dave.post("/api/v1/gateway/keys", json={"expires_in_days": days}).status_code == 422
            )
        assert dave.post("/api/v1/gateway/keys", json={"user": "admin"}).status_code == 403
        assert (
            dave.post("/api/v1/gateway/keys", json={"model": "echo", "category": "x"}).status_code
            == 422
        )
        created = dave.post("/api/v1/gateway/keys", json={"name": "nb", "model": "echo"})
        assert created.status_code == 201
        body = created.json()
        assert body["model"] == "echo" and body["key"].startswith("lgk_")
        lifetime = datetime.fromisoformat(body["expires_at"]) - datetime.fromisoformat(
            body["created_at"]
        )
        assert lifetime.days in (89, 90)
        assert [k["id"] for k in dave.get("/api/v1/gateway/keys").json()] == [body["id"]]
        # The inference key infers, and can do nothing else.
        with gw.client(body["key"]) as key_client:
            assert key_client.get("/v1/models").status_code == 200
            assert key_client.get("/api/v1/gateway/keys").status_code == 403
            assert key_client.post("/api/v1/gateway/keys", json={}).status_code == 403
        assert dave.delete(f"/api/v1/gateway/keys/{body['id']}").status_code == 200
        with gw.client(body["key"]) as key_client:
            assert key_client.get("/v1/models").status_code == 401
        # Someone else's key is not found.
        new_key(admin, "erin")
        everyone = admin.get("/api/v1/gateway/keys", params={"all": "true"}).json()
        erin = next(k for k in everyone if k["username"] == "erin")
        assert dave.delete(f"/api/v1/gateway/keys/{erin['id']}").status_code == 404
        assert dave.get("/api/v1/gateway/keys", params={"all": "true"}).status_code == 403
        # A key of dave's that may read the gateway may not give itself the right to infer.
        for scopes in (["gateway:read"], ["gateway:read", "account"]):
            reader = dave.post("/api/v1/keys", json={"name": "ro", "scopes": scopes}).json()
            with gw.client(reader["key"]) as reader_client:
                assert reader_client.get("/v1/models").status_code == 403
                refused = reader_client.post("/api/v1/gateway/keys", json={"name": "x"})
                assert refused.status_code == 403, refused.text


def test_settings_are_validated_and_applied(gw: LiveServer, admin: httpx.Client) -> None:
    assert admin.get("/api/v1/gateway/settings").json()["usage_weight"] == 10.0
    assert admin.patch("/api/v1/gateway/settings", json={"usage_scale": 0}).status_code == 422
    assert admin.patch("/api/v1/gateway/settings", json={"bogus": 1}).status_code == 422
    updated = admin.patch("/api/v1/gateway/settings", json={"wait_weight": 2.5})
    assert updated.status_code == 200 and updated.json()["wait_weight"] == 2.5
    assert gw.app.state.gateway.scheduler.config.wait_weight == 2.5  # type: ignore[union-attr]
    gw.restart()
    with gw.client(gw.admin_key) as again:
        assert again.get("/api/v1/gateway/settings").json()["wait_weight"] == 2.5


def test_model_details_are_for_admins(gw: LiveServer, admin: httpx.Client) -> None:
    secret_url = "http://user:pw@10.0.0.5:8001/v1"
    register(admin, "hidden", secret_url, state="disabled")
    register(admin, "creds", secret_url)
    new_key(admin, "val")  # a viewer
    login = admin.post("/api/v1/keys", json={"user": "val"}).json()["key"]
    private = {"backend_url", "model_path", "runtime_args"}
    with gw.client(login) as viewer:
        listed = viewer.get("/api/v1/gateway/models").json()
        assert "hidden" not in [m["id"] for m in listed] and "creds" in [m["id"] for m in listed]
        assert all(not private & m.keys() for m in listed)
        one = viewer.get("/api/v1/gateway/models/creds")
        assert one.status_code == 200 and not private & one.json().keys()
        assert one.json()["context_length"] == 4096
        # A model it may not use is as absent as an unknown one, to read or to estimate.
        assert viewer.get("/api/v1/gateway/models/hidden").status_code == 404
        estimate = viewer.post("/api/v1/gateway/estimate", json={"model_id": "hidden"})
        assert estimate.status_code == 404
        assert "pw" not in viewer.get("/api/v1/gateway/models").text
    # Admins see everything, but never the URL's password.
    shown = "http://user:***@10.0.0.5:8001/v1"
    assert admin.get("/api/v1/gateway/models/hidden").json()["backend_url"] == shown
    everything = {m["id"]: m for m in admin.get("/api/v1/gateway/models").json()}
    assert everything["creds"]["backend_url"] == shown and "runtime_args" in everything["creds"]
    backends = {b["model"]: b for b in admin.get("/api/v1/gateway/backends").json()}
    assert backends["creds"]["url"] == shown
    # The URL sent back as shown keeps the real one; a new one replaces it.
    catalog = gw.app.state.gateway.catalog  # type: ignore[union-attr]
    resent = admin.patch("/api/v1/gateway/models/creds", json={"backend_url": shown, "parallel": 2})
    assert resent.status_code == 200 and resent.json()["backend_url"] == shown
    assert catalog.models["creds"].backend_url == secret_url
    new = admin.patch("/api/v1/gateway/models/creds", json={"backend_url": "http://tok@h:1/v1"})
    assert new.json()["backend_url"] == "http://***@h:1/v1"
    assert catalog.models["creds"].backend_url == "http://tok@h:1/v1"
    audit = admin.get("/api/v1/audit", params={"action": "gateway.model.*"}).text
    assert "tok@" not in audit and "pw@" not in audit


def test_a_key_pin_never_reveals_a_disabled_model(gw: LiveServer, catalogue: httpx.Client) -> None:
    catalogue.patch("/api/v1/gateway/models/coder-b", json={"state": "disabled"})
    new_key(catalogue, "olga", role="operator")
    login = catalogue.post("/api/v1/keys", json={"user": "olga"}).json()["key"]
    with gw.client(login) as olga:
        # Pinning her own key to a model she may not see is answered as for an unknown one.
        hidden = olga.post("/api/v1/gateway/keys", json={"model": "coder-b"})
        unknown = olga.post("/api/v1/gateway/keys", json={"model": "no-such-model"})
        assert (hidden.status_code, unknown.status_code) == (400, 400)
        assert hidden.json()["error"]["message"] == "model: 'coder-b' does not exist"
        category_key = olga.post("/api/v1/gateway/keys", json={"category": "code"}).json()["key"]
    # A key pinned to the category lists its models that are not disabled.
    listed = openai.OpenAI(base_url=gw.url + "/v1", api_key=category_key).models.list()
    assert [m.id for m in listed.data] == ["coder-a"]
    # An admin may still pin a key to it (to use once enabled); it lists nothing meanwhile.
    pinned = catalogue.post("/api/v1/gateway/keys", json={"user": "olga", "model": "coder-b"})
    assert pinned.status_code == 201
    pinned_key = pinned.json()["key"]
    assert openai.OpenAI(base_url=gw.url + "/v1", api_key=pinned_key).models.list().data == []
    catalogue.patch("/api/v1/gateway/models/coder-b", json={"state": "ready"})
    listed = openai.OpenAI(base_url=gw.url + "/v1", api_key=pinned_key).models.list()
    assert [m.id for m in listed.data] == ["coder-b"]
