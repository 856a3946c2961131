"""Findings of a review of the brain, each shown against a live server or a real provider
client: what a provider, a model or a caller could do that the brain did not bound."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from legator.brain.providers import SDK_PROVIDERS, ProviderConfig, ProviderError, Turn
from legator.brain.router import MESSAGE_MAX_CHARS
from legator.brain.service import MAX_CONVERSATIONS_PER_USER
from tests.brain.helpers import Background
from tests.brain.raw_llm import (
    RawLLM,
    answer,
    block_delta,
    block_start,
    chunk,
    message_start,
)
from tests.support import LiveServer, live_server

MIB = 1024 * 1024


@pytest.fixture
def raw() -> Iterator[RawLLM]:
    with RawLLM() as server:
        yield server


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_one_endless_event_is_refused_before_it_fills_memory(raw: RawLLM, provider: str) -> None:
    """A provider that sends one event that never ends (no blank line) was buffered whole by
    the SDK's SSE decoder, copying the buffer at every read, until the time limit: hundreds of
    MiB and the event loop busy. It is refused once past ``MAX_EVENT_BYTES``."""
    sent = [0]

    async def endless() -> AsyncIterator[str]:
        yield "data: " + '{"a": "'
        piece = "x" * MIB
        for _ in range(512):
            sent[0] += len(piece)
            yield piece
            await asyncio.sleep(0)

    raw.script = [endless]
    config = ProviderConfig(provider, "raw-model", "sk-test", raw.base_url(provider))

    async def run() -> None:
        sdk = SDK_PROVIDERS[provider](config, max_retries=0)
        try:
            async with asyncio.timeout(20):
                await sdk.turn("", [{"role": "user", "content": "hi"}], [])
        finally:
            await sdk.client.close()

    started = time.monotonic()
    with pytest.raises(ProviderError, match="event of its stream passed the limit"):
        asyncio.run(run())
    assert time.monotonic() - started < 10
    assert sent[0] < 64 * MIB, f"{sent[0] // MIB} MiB sent before the turn ended"


def _turn(provider: str, raw: RawLLM) -> Turn:
    config = ProviderConfig(provider, "raw-model", "sk-test", raw.base_url(provider))

    async def run() -> Turn:
        sdk = SDK_PROVIDERS[provider](config, max_retries=0)
        try:
            return await sdk.turn("", [{"role": "user", "content": "hi"}], [])
        finally:
            await sdk.client.close()

    return asyncio.run(run())


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_stream_cut_short_is_not_a_complete_answer(raw: RawLLM, provider: str) -> None:
    """A stream that ends cleanly but before the answer did (no ``finish_reason`` or
    ``[DONE]``; no ``message_stop``) was taken as the model's whole answer: a task ended
    ``completed`` with half a sentence as its answer."""
    if provider == "openai":
        raw.script = [[chunk({"role": "assistant", "content": ""}), chunk({"content": "Restart"})]]
    else:
        start = block_start(0, {"type": "text", "text": ""})
        text = block_delta(0, {"type": "text_delta", "text": "Re"})
        raw.script = [[message_start(), start, text]]
    with pytest.raises(ProviderError, match="stream ended before the answer did"):
        _turn(provider, raw)
    # A whole answer still reads.
    raw.script = [answer(provider, "Restarted.")]
    assert _turn(provider, raw).text == "Restarted."


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_base_urls_credentials_stay_out_of_the_logs(
    raw: RawLLM, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A profile's ``https://user:pw@proxy/v1`` is shown masked by the API, but the HTTP client
    logged every model call's URL whole: the proxy's password in the server's log at INFO."""
    base = raw.base_url(provider).replace("http://", "http://brain:hunter2-proxy@")
    config = ProviderConfig(provider, "raw-model", "sk-test", base)
    raw.script = [answer(provider, "Fine.")]

    async def run() -> Turn:
        sdk = SDK_PROVIDERS[provider](config, max_retries=0)
        try:
            return await sdk.turn("", [{"role": "user", "content": "hi"}], [])
        finally:
            await sdk.client.close()

    with caplog.at_level(logging.DEBUG):
        assert asyncio.run(run()).text == "Fine."
    seen = [record.getMessage() for record in caplog.records]
    assert any("HTTP Request" in line for line in seen)  # the line is still there
    assert not [line for line in seen if "hunter2-proxy" in line]
    assert raw.headers[-1]["accept-encoding"] == "identity"  # so events can be measured
    # The credentials still reach the proxy, as Basic auth.
    assert (
        raw.headers[-1]["authorization"]
        == "Basic " + base64.b64encode(b"brain:hunter2-proxy").decode()
    )


# ---- the operator's limits hold for every caller ------------------------------------------------


@pytest.fixture
def fleet_server(tmp_path: Path, raw: RawLLM) -> Iterator[LiveServer]:
    with live_server(
        tmp_path / "data",
        fleet_offline_after_s=4,
        fleet_flush_interval_s=0.3,
        fleet_command_grace_s=3,
        llm_provider="openai",
        llm_model="raw-model",
        llm_api_key="sk-test",
        llm_base_url=raw.base_url("openai"),
        brain_max_steps=2,
        brain_task_timeout_s=2.0,
    ) as server:
        yield server


def test_a_task_cannot_ask_for_more_steps_or_time_than_the_operator_allows(
    admin: httpx.Client, spawn_probe, raw: RawLLM
) -> None:  # type: ignore[no-untyped-def]
    """``LEGATOR_BRAIN_MAX_STEPS`` and ``LEGATOR_BRAIN_TASK_TIMEOUT_S`` are the most a task
    may take ("most model turns in one task"), but a task's own ``max_steps`` (up to 100) and
    ``timeout_s`` (up to a day) went past them: any caller could spend more model turns and
    time than the operator allowed."""
    pid = spawn_probe("rv-limits").probe_id
    health = answer("openai", tools=[("get_health", {"probe": pid})])
    raw.script = [health] * 6
    body = {"goal": "loop", "max_steps": 5}
    transcript = admin.post(f"/api/v1/probes/{pid}/task", json=body).json()
    assert transcript["status"] == "step_limit", transcript
    assert len(transcript["steps"]) == 2
    assert transcript["error"] == "the step limit of 2 was reached before a final answer"
    # Fewer is fine.
    raw.script = [health] * 2
    fewer = admin.post(f"/api/v1/probes/{pid}/task", json={"goal": "loop", "max_steps": 1})
    assert len(fewer.json()["steps"]) == 1

    async def trickle() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            yield chunk({"content": "still thinking "})
            await asyncio.sleep(0.05)

    raw.script = [trickle]
    started = time.monotonic()
    slow = admin.post(f"/api/v1/probes/{pid}/task", json={"goal": "think", "timeout_s": 30})
    assert time.monotonic() - started < 10
    assert slow.json()["status"] == "time_limit"
    assert slow.json()["error"].startswith("the time limit of 2s was reached")


def test_one_user_runs_a_bounded_number_of_conversations_at_once(
    fleet_server: LiveServer, admin: httpx.Client, raw: RawLLM
) -> None:
    """Nothing bounded how many chats and tasks one caller ran at once: each holds a model
    stream, the provider's spending and, waiting for an approval, its time limit. Past
    ``MAX_CONVERSATIONS_PER_USER`` a new one is answered 429 at once; other users are not
    held back, and a slot is free again when its conversation ends."""

    async def trickle() -> AsyncIterator[str]:  # held until the 2 s time limit
        yield chunk({"role": "assistant", "content": ""})
        while True:
            yield chunk({"content": "thinking "})
            await asyncio.sleep(0.05)

    extra = 3
    raw.script = [trickle] * (MAX_CONVERSATIONS_PER_USER + extra + 1)
    chats = [
        Background(admin, "/api/v1/fleet/chat", {"message": f"hello {n}"})
        for n in range(MAX_CONVERSATIONS_PER_USER + extra)
    ]
    user = admin.post(
        "/api/v1/users",
        json={"username": "other-op", "password": "Correct-Horse-9!x", "role": "operator"},
    )
    assert user.status_code == 201, user.text
    key = admin.post("/api/v1/keys", json={"user": "other-op", "name": "k", "scopes": ["*"]})
    with fleet_server.client(key.json()["key"]) as other:
        time.sleep(0.5)
        assert other.post("/api/v1/fleet/chat", json={"message": "mine"}).status_code == 200
    statuses = sorted(chat.result().status_code for chat in chats)
    assert statuses == [200] * MAX_CONVERSATIONS_PER_USER + [429] * extra, statuses
    assert len(raw.requests) == MAX_CONVERSATIONS_PER_USER + 1
    refused = next(c.result() for c in chats if c.result().status_code == 429).json()
    assert "at most" in refused["error"]["message"], refused
    # All ended: the slots are free again.
    raw.script = [answer("openai", "Hi.")]
    again = admin.post("/api/v1/fleet/chat", json={"message": "again"})
    assert again.status_code == 200 and again.json()["answer"] == "Hi."


def test_a_chat_socket_refuses_a_message_far_past_any_valid_one(
    fleet_server: LiveServer, admin: httpx.Client, raw: RawLLM
) -> None:
    """A message is at most 20,000 characters, but the socket queued frames of any size the
    server takes (16 MiB), 16 of them: 256 MiB held for one socket before any was read. One
    past ``MESSAGE_MAX_CHARS`` closes the socket with 1009 (message too big)."""
    url = fleet_server.url.replace("http://", "ws://") + "/ws/chat"
    headers = {"Authorization": f"Bearer {fleet_server.admin_key}"}
    raw.script = [answer("openai", "Hi.")]
    with connect(url, additional_headers=headers, open_timeout=10, max_size=None) as socket:
        socket.send(json.dumps({"message": "hi"}))
        assert json.loads(socket.recv(timeout=30))["type"] in ("token", "done")
        socket.send(json.dumps({"message": "x" * (MESSAGE_MAX_CHARS + 1)}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                socket.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_two_messages_at_once_on_one_session_lose_neither(
    fleet_server: LiveServer, admin: httpx.Client, raw: RawLLM
) -> None:
    """Each message read the session, talked with the model and wrote its history back: two
    at once on one session (two tabs, a retry) each wrote the history as they had read it,
    and the one that ended last erased the other's exchange. The second is refused (409)."""

    def slow(text: str) -> Callable[[], AsyncIterator[str]]:
        async def events() -> AsyncIterator[str]:
            await asyncio.sleep(0.8)
            for event in answer("openai", text):
                yield event

        return events

    raw.script = [answer("openai", "Hello.")]
    first = admin.post("/api/v1/fleet/chat", json={"message": "first"}).json()
    session = first["session_id"]
    raw.script = [slow("One."), slow("Two.")]
    chats = [
        Background(admin, "/api/v1/fleet/chat", {"message": m, "session_id": session})
        for m in ("one", "two")
    ]
    results = [chat.result() for chat in chats]
    stored = admin.get("/api/v1/probes/all/chat/sessions").json()[0]["messages"]
    said = [m["content"] for m in stored if m["role"] == "user"]
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 409], (statuses, said)
    assert len(said) == 2 and said[0] == "first", said
