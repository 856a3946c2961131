"""Authentication and authorisation, as an attacker tries them."""

from __future__ import annotations

import httpx
from sqlalchemy import update

from legator.core.auth.models import User
from tests.support import LiveServer

PASSWORD = "correct horse battery"


def test_a_username_shaped_like_a_user_id_is_refused(api: httpx.Client) -> None:
    admin_id = api.get("/api/v1/me").json()["user_id"]
    for name in (admin_id, admin_id.upper(), "00000000-0000-4000-8000-000000000000"):
        body = {"username": name, "password": PASSWORD, "role": "viewer"}
        refused = api.post("/api/v1/users", json=body)
        assert refused.status_code == 422, (name, refused.text)
        assert "user id" in refused.text
    # Near misses stay valid names.
    for name in (admin_id + "-2", admin_id[:35]):
        body = {"username": name, "password": PASSWORD, "role": "viewer"}
        assert api.post("/api/v1/users", json=body).status_code == 201, name


def test_an_older_username_equal_to_an_admins_id_stands_for_its_own_user_only(
    server: LiveServer, api: httpx.Client
) -> None:
    """A database from before such names were refused may hold one: naming a user by id
    finds the user of that id, and a key its holder makes is its holder's own."""
    admin_id = api.get("/api/v1/me").json()["user_id"]
    body = {"username": "mallory", "password": PASSWORD, "role": "viewer"}
    assert api.post("/api/v1/users", json=body).status_code == 201

    async def rename() -> None:
        assert server.core is not None
        async with server.core.db.write() as session:
            await session.execute(
                update(User).where(User.username == "mallory").values(username=admin_id)
            )

    server.call(rename())
    assert api.get(f"/api/v1/users/{admin_id}").json()["username"] == "admin"
    with server.client() as browser:
        signed_in = browser.post(
            "/api/v1/auth/login", json={"username": admin_id, "password": PASSWORD}
        )
        assert signed_in.status_code == 200, signed_in.text
        mallory_id = signed_in.json()["user_id"]
        assert mallory_id != admin_id and signed_in.json()["role"] == "viewer"
        for body in ({"name": "mine"}, {"name": "mine", "user": admin_id}):
            created = browser.post("/api/v1/keys", json=body, headers={"Origin": server.url})
            assert created.status_code == 201, created.text
            assert created.json()["user_id"] == mallory_id
            with server.client(created.json()["key"]) as keyed:
                assert keyed.get("/api/v1/me").json()["role"] == "viewer"
    # An admin disabling "that user" by its id disables the user of that id, not the admin.
    other = {"username": "second-admin", "password": PASSWORD, "role": "admin"}
    assert api.post("/api/v1/users", json=other).status_code == 201
    disabled = api.patch(f"/api/v1/users/{mallory_id}", json={"disabled": True})
    assert disabled.status_code == 200 and disabled.json()["id"] == mallory_id
    assert api.get("/api/v1/me").status_code == 200
