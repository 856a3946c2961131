"""A provider whose answer is malformed, breaks off, or is an error quoting the caller's key:
the task or chat ends with ``status: error`` and a short message, with its audit, usage and
session handling intact, and a command already run is never run again. Real app, real probe,
a fake provider speaking the real SSE wire formats (``raw_llm``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from legator.brain.local import LocalProvider
from legator.brain.providers import (
    SDK_PROVIDERS,
    ProviderConfig,
    ProviderError,
    Turn,
)
from tests.brain.helpers import dispatches
from tests.brain.raw_llm import (
    DROP,
    RawLLM,
    answer,
    block_delta,
    block_start,
    chunk,
    message_end,
    message_start,
    sse,
    tool_part,
    usage_chunk,
)
from tests.fleet.e2e.conftest import UNATTENDED
from tests.gateway.conftest import register
from tests.support import LiveServer, live_server

KEY = "sk-test-0123456789abcdef-SECRET"

# Malformed answers, each after a well-formed start, in each wire format.
OPENAI_BAD: dict[str, list[str]] = {
    "event not JSON": [chunk({"role": "assistant"}), "data: {this is not json\n\n"],
    "index not an integer": [tool_part("zero", "list_probes", "{}"), "data: [DONE]\n\n"],
    "name not a string": [tool_part(0, 5, "{}", "call_0"), "data: [DONE]\n\n"],
    "arguments an object": [tool_part(0, "list_probes", {"tag": "x"}), "data: [DONE]\n\n"],
    "choices an object": [sse({"id": "x", "choices": {"0": {}}}), "data: [DONE]\n\n"],
    "content an object": [chunk({"content": {"text": "hi"}}), "data: [DONE]\n\n"],
    "usage not a count": [chunk({"content": "hi"}), usage_chunk("many"), "data: [DONE]\n\n"],
    "connection dropped": [chunk({"content": "partial"}), DROP],
}
ANTHROPIC_BAD: dict[str, list[str]] = {
    "event not JSON": [message_start(), sse("{this is not json", "content_block_delta")],
    "index not an integer": [
        message_start(),
        block_start("zero", {"type": "tool_use", "id": "t", "name": "list_probes", "input": {}}),
        *message_end("tool_use"),
    ],
    "name not a string": [
        message_start(),
        block_start(0, {"type": "tool_use", "id": "t", "name": 5, "input": {}}),
        *message_end("tool_use"),
    ],
    "input not a string": [
        message_start(),
        block_start(0, {"type": "tool_use", "id": "t", "name": "list_probes", "input": {}}),
        block_delta(0, {"type": "input_json_delta", "partial_json": {"tag": "x"}}),
        *message_end("tool_use"),
    ],
    "usage not a count": [message_start(input_tokens="many"), *message_end()],
    "connection dropped": [message_start(), DROP],
}
BAD = {"openai": OPENAI_BAD, "anthropic": ANTHROPIC_BAD}
LABEL = {"openai": "OpenAI-compatible provider", "anthropic": "Anthropic provider"}


@pytest.fixture
def raw() -> Iterator[RawLLM]:
    with RawLLM() as server:
        yield server


@pytest.fixture
def fleet_server(tmp_path: Path, raw: RawLLM, provider: str) -> Iterator[LiveServer]:
    with live_server(
        tmp_path / "data",
        fleet_offline_after_s=4,
        fleet_flush_interval_s=0.3,
        fleet_command_grace_s=3,
        llm_provider=provider,
        llm_model="raw-model",
        llm_api_key=KEY,
        llm_base_url=raw.base_url(provider),
    ) as server:
        yield server


def _events(admin: httpx.Client, action: str) -> list[dict[str, Any]]:
    found = admin.get("/api/v1/audit", params={"action": action, "limit": 100}).json()
    return list(found["events"])


def test_a_malformed_answer_after_a_command_ends_the_task_as_an_error(
    admin: httpx.Client, spawn_probe, raw: RawLLM, provider: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("pf-task", max_level="remediate", policy=UNATTENDED)
    pid = probe.probe_id
    kinds = BAD[provider]
    for number, (kind, bad) in enumerate(kinds.items(), start=1):
        marker = tmp_path / f"ran-{number}"
        touch = {"probe": pid, "command": "touch", "args": [str(marker)], "reason": "step one"}
        raw.script = [answer(provider, tools=[("run_command", touch)]), bad]
        response = admin.post(f"/api/v1/probes/{pid}/task", json={"goal": kind}, timeout=60)
        assert response.status_code == 200, f"{kind}: {response.text}"
        transcript = response.json()
        assert transcript["status"] == "error", (kind, transcript)
        error = transcript["error"]
        assert error.startswith(LABEL[provider]) and len(error) < 300, (kind, error)
        assert KEY not in response.text
        # The command of the first turn ran once and is in the transcript.
        assert len(transcript["steps"]) == 1, kind
        assert transcript["steps"][0]["tools"][0]["result"]["status"] == "completed", kind
        assert marker.exists(), kind
        assert len(dispatches(admin)) == number, kind  # never run again
        finished = _events(admin, "brain.task.finished")
        assert len(finished) == number, kind
        assert finished[0]["details"]["status"] == "error"
        assert finished[0]["details"]["goal"] == kind
    usage = {row["feature"]: row for row in admin.get("/api/v1/brain/usage").json()}["task"]
    assert usage["requests"] == len(kinds)  # one step recorded a task
    assert usage["input_tokens"] >= 11 * len(kinds)  # the first turn's usage was counted


@pytest.mark.parametrize("provider", ["openai"])
def test_the_chat_socket_answers_a_malformed_stream_with_an_error_and_goes_on(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, raw: RawLLM
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("pf-ws")
    pid = probe.probe_id
    raw.script = [
        [chunk({"content": "Looking"}), *OPENAI_BAD["index not an integer"]],
        answer("openai", "All fine."),
    ]
    url = fleet_server.url.replace("http://", "ws://") + "/ws/chat"
    headers = {"Authorization": f"Bearer {fleet_server.admin_key}"}
    with connect(url, additional_headers=headers, open_timeout=10) as socket:
        results = []
        for message in ("what is up?", "and now?"):
            socket.send(json.dumps({"probe": pid, "message": message}))
            events = [json.loads(socket.recv(timeout=30))]
            while events[-1]["type"] not in ("done", "error"):
                events.append(json.loads(socket.recv(timeout=30)))
            results.append(events[-1])
    failed, answered = results
    assert failed["type"] == "done" and failed["status"] == "error", failed
    assert "index" in failed["error"] and KEY not in json.dumps(failed)
    assert answered["status"] == "completed" and answered["answer"] == "All fine."
    audited = [e["details"]["status"] for e in _events(admin, "brain.probe_chat")]
    assert sorted(audited) == ["completed", "error"]


# ---- the providers themselves ----------------------------------------------------------------


def _turn(provider: str, raw: RawLLM, tools: list[dict[str, Any]] | None = None) -> Turn:
    config = ProviderConfig(provider, "raw-model", KEY, raw.base_url(provider))

    async def run() -> Turn:
        sdk = SDK_PROVIDERS[provider](config, max_retries=0)
        try:
            messages = [{"role": "user", "content": "hi"}]
            return await sdk.turn("be brief", messages, tools or [])
        finally:
            await sdk.client.close()

    return asyncio.run(run())


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_an_error_body_reaches_the_transcript_short_and_without_the_key(
    raw: RawLLM, provider: str
) -> None:
    echo = f"invalid key {KEY}; " + "the provider says a great deal more " * 300
    body = {"type": "error", "error": {"type": "authentication_error", "message": echo}}
    raw.script = [{"status": 401, "body": body}]
    with pytest.raises(ProviderError) as failed:
        _turn(provider, raw)
    message = str(failed.value)
    assert message.startswith(f"{LABEL[provider]} failed:"), message
    assert KEY not in message and "***" in message
    assert len(message) < 400 and "\n" not in message


def test_a_malformed_answer_from_the_local_gateway_model_is_a_provider_error(
    tmp_path: Path, raw: RawLLM
) -> None:
    with (
        live_server(tmp_path / "data") as server,
        server.client(server.admin_key) as api,
    ):
        register(api, "raw", f"{raw.url}/v1", upstream_model="raw")
        gateway = server.app.state.gateway  # type: ignore[union-attr]
        provider = LocalProvider(gateway, "raw", max_tokens=64)
        messages = [{"role": "user", "content": "hi"}]
        for kind in ("index not an integer", "name not a string", "arguments an object"):
            raw.script = [OPENAI_BAD[kind]]
            with pytest.raises(ProviderError, match="local provider") as failed:
                server.call(provider.turn("be brief", messages, []))
            assert "tool call" in str(failed.value), kind
            assert gateway.scheduler.pools["raw"].in_use == 0, kind  # its slot is free again
        raw.script = [answer("openai", "fine")]
        assert server.call(provider.turn("be brief", messages, [])).text == "fine"


def test_tool_arguments_nested_past_the_stack_are_kept_as_invalid(raw: RawLLM) -> None:
    nested = "[" * 50_000  # json.loads raises RecursionError, not a JSONDecodeError
    ended = [chunk({}, "tool_calls"), "data: [DONE]\n\n"]
    raw.script = [[tool_part(0, "list_probes", nested, "call_0"), *ended]]
    (call,) = _turn("openai", raw).tool_calls
    assert call.name == "list_probes" and call.arguments == {"_invalid_json": nested}


def test_an_anthropic_tool_input_may_come_whole_with_its_block(raw: RawLLM) -> None:
    def start(arguments: dict[str, Any]) -> list[str]:
        block = {"type": "tool_use", "id": "toolu_1", "name": "list_probes", "input": arguments}
        return [message_start(), block_start(0, block), *message_end("tool_use")]

    raw.script = [start({"tag": "web"}), start({"tag": "x" * 70_000})]
    (call,) = _turn("anthropic", raw).tool_calls
    assert (call.id, call.name, call.arguments) == ("toolu_1", "list_probes", {"tag": "web"})
    with pytest.raises(ProviderError, match="arguments passed the limit"):
        _turn("anthropic", raw)
