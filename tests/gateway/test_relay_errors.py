"""An upstream's error text reaches the client masked and marked where it was cut."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from legator.core.audit.sanitiser import CLIP_MARK
from tests.gateway.conftest import register
from tests.gateway.upstreams import SECRET, LeakyUpstream
from tests.support import LiveServer

MESSAGES = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def leaky() -> Iterator[LeakyUpstream]:
    server = LeakyUpstream().start()
    yield server
    server.stop()


def _check(message: str) -> None:
    assert SECRET not in message
    assert "sk-proj-qzLeak" not in message  # not even the start of it
    assert message.endswith(CLIP_MARK), message[-80:]
    assert len(message) < 800  # the 2000 characters after the secret were cut


@pytest.mark.parametrize("mode", ["leakjson", "leaktext"])
def test_an_error_answer_is_masked_and_marked_cut(
    gw: LiveServer, admin: httpx.Client, leaky: LeakyUpstream, mode: str
) -> None:
    register(admin, mode, leaky.url, upstream_model=mode)
    for stream in (False, True):
        answer = admin.post(
            "/v1/chat/completions", json={"model": mode, "stream": stream, "messages": MESSAGES}
        )
        assert answer.status_code == 502, answer.text
        _check(answer.json()["error"]["message"])


def test_an_error_reported_mid_stream_is_masked_and_marked_cut(
    gw: LiveServer, admin: httpx.Client, leaky: LeakyUpstream
) -> None:
    register(admin, "leakstream", leaky.url, upstream_model="leakstream")
    body = {"model": "leakstream", "max_tokens": 8, "stream": True, "messages": MESSAGES}
    with admin.stream("POST", "/v1/messages", json=body) as answer:
        lines = [line for line in answer.iter_lines() if line.startswith("data:")]
    error = json.loads(lines[-1][5:])
    assert error["type"] == "error"
    _check(error["error"]["message"])


def test_an_error_event_passed_on_is_masked_and_marked_cut(
    gw: LiveServer, admin: httpx.Client, leaky: LeakyUpstream
) -> None:
    """The OpenAI route passes the backend's error event on, with its message masked."""
    register(admin, "leakstream", leaky.url, upstream_model="leakstream")
    body = {"model": "leakstream", "stream": True, "messages": MESSAGES}
    with admin.stream("POST", "/v1/chat/completions", json=body) as answer:
        lines = [line for line in answer.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][5:])["error"]
    _check(error["message"])
    assert error["message"].startswith("upstream refused the call")
