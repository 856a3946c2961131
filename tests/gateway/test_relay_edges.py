"""Edges of the relay: clients that leave before the answer, odd stream ends, a stream answered
with something else than events, and request bodies that are not quite valid."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from legator.gateway.relay import _retry_after
from tests.gateway import scripted_upstream
from tests.gateway.conftest import register, usage_statuses
from tests.gateway.scripted_upstream import ScriptedUpstream
from tests.support import LiveServer

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def _body(path: str, model: str, stream: bool, text: str = "one two") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }
    if path == MESSAGES:
        body["max_tokens"] = 16
    return body


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize(
    ("path", "stream"), [(CHAT, False), (CHAT, True), (MESSAGES, False), (MESSAGES, True)]
)
def test_a_client_gone_before_the_backend_answers_frees_the_slot_and_stops_the_backend(
    gw: LiveServer,
    admin: httpx.Client,
    upstream: ScriptedUpstream,
    path: str,
    stream: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scripted_upstream, "SLOW_JSON_S", 30.0)
    register(admin, "slowjson", upstream.url, upstream_model="slowjson", parallel=1)
    pool = gw.app.state.gateway.scheduler.pools  # type: ignore[union-attr]
    abandoned = upstream.abandoned
    with (
        pytest.raises(httpx.ReadTimeout),
        gw.client(gw.admin_key, timeout=0.3) as impatient,
    ):
        impatient.post(path, json=_body(path, "slowjson", stream))
    # The backend answers after 30 s: the slot must come back long before.
    assert _wait_for(lambda: pool["slowjson"].in_use == 0, 15), "the slot waited for the backend"
    assert _wait_for(lambda: upstream.abandoned == abandoned + 1, 15), "the backend went on"
    assert usage_statuses(gw, "slowjson") == [499]


@pytest.mark.parametrize("mode", ["donenospace", "doneid"])
def test_done_without_a_space_or_after_an_id_line_ends_the_stream(
    gw: LiveServer, admin: httpx.Client, upstream: ScriptedUpstream, mode: str
) -> None:
    register(admin, mode, upstream.url, upstream_model=mode)
    with gw.client(gw.admin_key) as raw:
        with raw.stream("POST", CHAT, json=_body(CHAT, mode, True)) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line]
        assert not any("error" in line for line in events), events
        assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
        text = "".join(
            json.loads(e[5:])["choices"][0]["delta"].get("content") or ""
            for e in events[:-1]
            if e.startswith("data:")
        )
        assert text == "echo: one two"
        anthropic = raw.post(MESSAGES, json=_body(MESSAGES, mode, True)).text
        assert "event: message_stop" in anthropic and "event: error" not in anthropic
    assert usage_statuses(gw, mode) == [200, 200]


@pytest.mark.parametrize("mode", ["html", "ignorestream"])
def test_a_stream_answered_with_something_other_than_events_is_a_502(
    gw: LiveServer, admin: httpx.Client, upstream: ScriptedUpstream, mode: str
) -> None:
    register(admin, mode, upstream.url, upstream_model=mode)
    with gw.client(gw.admin_key) as raw:
        openai = raw.post(CHAT, json=_body(CHAT, mode, True))
        assert openai.status_code == 502, openai.text
        assert "text/event-stream" in openai.json()["error"]["message"]
        anthropic = raw.post(MESSAGES, json=_body(MESSAGES, mode, True))
        assert anthropic.status_code == 502, anthropic.text
        assert anthropic.json()["type"] == "error"
        assert "text/event-stream" in anthropic.json()["error"]["message"]
    assert usage_statuses(gw, mode) == [502, 502]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_non_json_constants_are_refused(
    gw: LiveServer, upstream: ScriptedUpstream, path: str, constant: str
) -> None:
    sent = len(upstream.requests)
    body = json.dumps(_body(path, "echo", False))[:-1] + f', "temperature": {constant}}}'
    with gw.client(gw.admin_key) as raw:
        answer = raw.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert constant.lstrip("-") in answer.json()["error"]["message"]
    assert len(upstream.requests) == sent


def test_include_usage_must_be_a_boolean(gw: LiveServer, upstream: ScriptedUpstream) -> None:
    with gw.client(gw.admin_key) as raw:
        for value in ("false", 0, 1, []):
            body = {**_body(CHAT, "echo", True), "stream_options": {"include_usage": value}}
            answer = raw.post(CHAT, json=body)
            assert answer.status_code == 400, answer.text
            assert "stream_options.include_usage" in answer.json()["error"]["message"]
        body = {**_body(CHAT, "echo", True), "stream_options": {"include_usage": False}}
        answer = raw.post(CHAT, json=body)
        assert answer.status_code == 200
        assert '"usage": {' not in answer.text  # the usage chunk it did not ask for is dropped
    assert usage_statuses(gw, "echo") == [200]


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("stream", [False, True])
def test_a_rate_limited_backend_is_a_429_with_its_retry_after(
    gw: LiveServer, admin: httpx.Client, upstream: ScriptedUpstream, path: str, stream: bool
) -> None:
    register(admin, "ratelimited", upstream.url, upstream_model="ratelimited")
    with gw.client(gw.admin_key) as client:
        response = client.post(path, json=_body(path, "ratelimited", stream))
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "7"
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and "slow down" in error["message"]
    assert usage_statuses(gw, "ratelimited") == [429]


def test_a_backends_retry_after_is_bounded() -> None:
    assert [
        _retry_after(v) for v in (None, "", "0", "7", "99999", "Wed, 21 Oct 2026 07:28:00 GMT")
    ] == [
        "1",
        "1",
        "1",
        "7",
        "3600",
        "1",
    ]
