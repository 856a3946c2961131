"""The live metrics stream (``GET /api/v1/gateway/events``) as an attacker and an operator see
it: it ends once its credential no longer holds, follows a change of role, and one user
cannot hold an unbounded number of them open."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import openai
import pytest

from legator.core.errors import TooManyRequests
from legator.core.http.live import PER_HOLDER, LiveStreams
from tests.support import LiveServer, eventually

EVENTS = "/api/v1/gateway/events"
PASSWORD = "correct horse battery"


def user_key(admin: httpx.Client, username: str, role: str = "viewer") -> dict[str, str]:
    """A new user of ``role`` and an unrestricted API key of theirs (its ``id`` and ``key``)."""
    created = admin.post(
        "/api/v1/users", json={"username": username, "password": PASSWORD, "role": role}
    )
    assert created.status_code == 201, created.text
    key = admin.post("/api/v1/keys", json={"name": "stream", "user": username})
    assert key.status_code == 201, key.text
    return key.json()  # type: ignore[no-any-return]


def snapshots(response: httpx.Response) -> Iterator[dict[str, object]]:
    """The stream's snapshots as they come; ends when the server ends the stream."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield json.loads(line[5:])


def ends_within(stream: Iterator[dict[str, object]], seconds: float) -> bool:
    """Whether the server ends ``stream`` within ``seconds`` (snapshots meanwhile are read):
    one that is never ended fails at its first snapshot after them, every LIVE_INTERVAL_S."""
    deadline = time.monotonic() + seconds
    return all(time.monotonic() <= deadline for _ in stream)


def models_in(snapshot: dict[str, object]) -> list[str]:
    return [m["model"] for m in snapshot["models"]]  # type: ignore[attr-defined,index]


def stream_status(gw: LiveServer, key: str) -> int:
    """The status a new stream with ``key`` opens with (it is closed at once)."""
    with gw.client(key) as client, client.stream("GET", EVENTS) as response:
        return response.status_code


def open_tasks(gw: LiveServer) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return gw.call(count())


def test_stream_ends_when_its_key_is_revoked(gw: LiveServer, admin: httpx.Client) -> None:
    key = user_key(admin, "mallory")
    with gw.client(key["key"]) as viewer, viewer.stream("GET", EVENTS) as response:
        assert response.status_code == 200
        stream = snapshots(response)
        next(stream)
        assert admin.delete(f"/api/v1/keys/{key['id']}").status_code == 200
        assert viewer.get("/api/v1/me").status_code == 401
        assert ends_within(stream, 15), "a revoked key kept receiving live metrics"


def test_stream_ends_when_its_session_signs_out(gw: LiveServer, admin: httpx.Client) -> None:
    user_key(admin, "sam")
    with gw.client() as browser:
        signed_in = browser.post(
            "/api/v1/auth/login", json={"username": "sam", "password": PASSWORD}
        )
        assert signed_in.status_code == 200, signed_in.text
        cookie = dict(browser.cookies)
        with gw.client(cookies=cookie) as tab, tab.stream("GET", EVENTS) as response:
            stream = snapshots(response)
            next(stream)
            signed_out = browser.post("/api/v1/auth/logout", headers={"Origin": gw.url})
            assert signed_out.status_code == 204
            assert ends_within(stream, 15), "a signed-out session kept receiving live metrics"


def test_stream_follows_a_demotion(gw: LiveServer, admin: httpx.Client) -> None:
    """An admin sees disabled models; once demoted to viewer, the same stream must not."""
    openai.OpenAI(
        base_url=gw.url + "/v1", api_key=gw.admin_key, max_retries=0
    ).chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    assert admin.patch("/api/v1/gateway/models/echo", json={"state": "disabled"}).status_code == 200
    key = user_key(admin, "olga", role="admin")
    with gw.client(key["key"]) as ops, ops.stream("GET", EVENTS) as response:
        stream = snapshots(response)
        assert "echo" in models_in(next(stream))
        demoted = admin.patch("/api/v1/users/olga", json={"role": "viewer"})
        assert demoted.status_code == 200, demoted.text
        next(stream)  # may have been computed before the change
        assert "echo" not in models_in(next(stream)), "a demoted admin still sees disabled models"


def test_one_user_cannot_hold_unbounded_streams(gw: LiveServer, admin: httpx.Client) -> None:
    key = user_key(admin, "hoarder")["key"]
    with ExitStack() as streams:
        for _ in range(PER_HOLDER):
            client = streams.enter_context(gw.client(key))
            response = streams.enter_context(client.stream("GET", EVENTS))
            assert response.status_code == 200
        with gw.client(key) as extra, extra.stream("GET", EVENTS) as refused:
            assert refused.status_code == 429, "one user opened streams without limit"
            assert "live metrics streams" in json.loads(refused.read())["error"]["message"]
        # Another user is not held back by this one's streams.
        assert stream_status(gw, user_key(admin, "bystander")["key"]) == 200
    # Closed streams give their places back.
    eventually(lambda: stream_status(gw, key), 200, timeout=10)


def test_closed_streams_leave_no_task_behind(gw: LiveServer, admin: httpx.Client) -> None:
    key = user_key(admin, "browser")["key"]
    at_rest = open_tasks(gw)
    with ExitStack() as streams:
        reading = []  # a reader dropped would close its response
        for _ in range(PER_HOLDER):
            client = streams.enter_context(gw.client(key))
            reading.append(snapshots(streams.enter_context(client.stream("GET", EVENTS))))
            next(reading[-1])
        assert open_tasks(gw) > at_rest
    eventually(lambda: open_tasks(gw), at_rest, timeout=10)


def test_thousands_of_users_cannot_shut_admins_out() -> None:
    """Past ``total`` open streams, non-admins are refused; an admin still gets one."""
    streams = LiveStreams("live metrics", per_holder=2, total=3)
    with ExitStack() as held:
        for user in ("u1", "u2", "u3"):
            held.enter_context(streams.hold(user, admin=False))
        with pytest.raises(TooManyRequests, match="3 live metrics streams open"):
            held.enter_context(streams.hold("u4", admin=False))
        held.enter_context(streams.hold("root", admin=True))
        assert streams.open == 4
    assert streams.open == 0
    with streams.hold("u4", admin=False):
        assert streams.open == 1
