"""Limits inside one step: a model turn that never ends is cut at the task's time limit; one
turn's text, tool-call arguments and number of tool calls are capped; the deadline is checked
before each tool call. Real app, real probe, a fake provider speaking the real SSE wire
formats (``raw_llm``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from legator.brain.agent import MAX_TOOL_CALLS_PER_TURN
from legator.brain.providers import (
    MAX_TOOL_ARGUMENTS_CHARS,
    MAX_TOOL_CALLS_READ,
    MAX_TURN_TEXT_CHARS,
    SDK_PROVIDERS,
    ProviderConfig,
    ProviderError,
    Turn,
)
from tests.brain.helpers import dispatches
from tests.brain.llm_server import tool_results
from tests.brain.raw_llm import (
    RawLLM,
    answer,
    block_delta,
    block_start,
    block_stop,
    chunk,
    message_end,
    message_start,
    tool_part,
)
from tests.fleet.e2e.conftest import UNATTENDED
from tests.support import LiveServer, live_server

PIECE = 64 * 1024


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
        llm_api_key="sk-test",
        llm_base_url=raw.base_url(provider),
    ) as server:
        yield server


@pytest.mark.parametrize("provider", ["openai"])
def test_a_model_turn_that_never_ends_is_cut_at_the_time_limit(
    admin: httpx.Client, spawn_probe, raw: RawLLM
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("tl-forever")

    async def trickle() -> AsyncIterator[str]:  # each read well inside the SDK's timeout
        yield chunk({"role": "assistant", "content": ""})
        while True:
            yield chunk({"content": "still thinking " * 10})
            await asyncio.sleep(0.05)

    raw.script = [trickle]
    started = time.monotonic()
    response = admin.post(
        f"/api/v1/probes/{probe.probe_id}/task",
        json={"goal": "think", "timeout_s": 1.5},
        timeout=60,
    )
    assert time.monotonic() - started < 20  # cut at its 1.5 s: the turn itself never ends
    transcript = response.json()
    assert transcript["status"] == "time_limit", transcript
    assert transcript["error"] == "the time limit of 1.5s was reached while the model was answering"
    finished = admin.get("/api/v1/audit", params={"action": "brain.task.finished"}).json()
    assert finished["events"][0]["details"]["status"] == "time_limit"


def test_at_most_sixteen_tool_calls_of_one_turn_run(
    admin: httpx.Client, spawn_probe, raw: RawLLM, provider: str
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("tl-many")
    asked = MAX_TOOL_CALLS_PER_TURN + 4
    raw.script = [
        answer(provider, tools=[("get_health", {"probe": probe.probe_id})] * asked),
        answer(provider, "Healthy."),
    ]
    response = admin.post(f"/api/v1/probes/{probe.probe_id}/task", json={"goal": "health"})
    transcript = response.json()
    assert transcript["status"] == "completed", transcript
    calls = transcript["steps"][0]["tools"]
    assert len(calls) == asked
    assert all("not_run" not in c and c["probe"] == probe.probe_id for c in calls[:16])
    assert [c["not_run"] for c in calls[16:]] == ["too_many_calls"] * 4
    # The model was answered for every call, the last four as not run.
    shown = tool_results(raw.requests[-1])
    assert len(shown) == asked and all('"score"' in text for text in shown[:16])
    assert all(text.startswith("not run: at most 16 tool calls") for text in shown[16:])


@pytest.mark.parametrize("provider", ["openai"])
def test_the_deadline_is_checked_before_each_tool_call(
    admin: httpx.Client, spawn_probe, raw: RawLLM
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("tl-slow", max_level="remediate", policy=UNATTENDED)
    pid = probe.probe_id
    sleep = {"probe": pid, "command": "sleep", "args": ["1"], "reason": "wait"}
    raw.script = [answer("openai", tools=[("run_command", sleep)] * 5)]
    started = time.monotonic()
    response = admin.post(
        f"/api/v1/probes/{pid}/task", json={"goal": "wait", "timeout_s": 2, "max_steps": 1}
    )
    took = time.monotonic() - started
    transcript = response.json()
    assert transcript["status"] == "time_limit", transcript
    calls = transcript["steps"][0]["tools"]
    ran = [c for c in calls if "result" in c]
    skipped = [c for c in calls if c.get("not_run") == "time_limit"]
    assert 1 <= len(ran) <= 2 and len(ran) + len(skipped) == 5, calls
    assert skipped[0]["error"] == "not run: the time limit of 2s was reached"
    assert transcript["error"].endswith(f"{len(skipped)} tool call(s) were not run")
    assert len(dispatches(admin)) == len(ran)
    # The calls counted above prove the check; this catches a wait long past the 2 s limit.
    assert took < 10


# ---- one turn's caps, at the providers ---------------------------------------------------------


def _turn(provider: str, raw: RawLLM, streamed: list[str]) -> Turn:
    config = ProviderConfig(provider, "raw-model", "sk-test", raw.base_url(provider))

    async def on_token(text: str) -> None:
        streamed.append(text)

    async def run() -> Turn:
        sdk = SDK_PROVIDERS[provider](config, max_retries=0)
        try:
            return await sdk.turn("", [{"role": "user", "content": "hi"}], [], on_token)
        finally:
            await sdk.client.close()

    return asyncio.run(run())


def _openai(kind: str) -> list[str]:
    if kind == "text":
        pieces = MAX_TURN_TEXT_CHARS // PIECE + 2
        return [chunk({"content": "x" * PIECE}) for _ in range(pieces)]
    if kind == "arguments":
        head = tool_part(0, "list_probes", '{"tag": "', "call_0")
        pieces = MAX_TOOL_ARGUMENTS_CHARS // 8192 + 2
        return [head, *[tool_part(0, None, "x" * 8192) for _ in range(pieces)]]
    return [tool_part(i, "list_probes", "{}", f"call_{i}") for i in range(MAX_TOOL_CALLS_READ + 1)]


def _anthropic(kind: str) -> list[str]:
    def tool(index: int) -> str:
        block = {"type": "tool_use", "id": f"t{index}", "name": "list_probes", "input": {}}
        return block_start(index, block)

    if kind == "text":
        pieces = MAX_TURN_TEXT_CHARS // PIECE + 2
        text = [block_delta(0, {"type": "text_delta", "text": "x" * PIECE})] * pieces
        return [block_start(0, {"type": "text", "text": ""}), *text]
    if kind == "arguments":
        piece = block_delta(0, {"type": "input_json_delta", "partial_json": "x" * 8192})
        return [tool(0), *[piece] * (MAX_TOOL_ARGUMENTS_CHARS // 8192 + 2)]
    return [e for i in range(MAX_TOOL_CALLS_READ + 1) for e in (tool(i), block_stop(i))]


LIMITS = {
    "text": f"{MAX_TURN_TEXT_CHARS:,} characters of text",
    "arguments": f"arguments passed the limit of {MAX_TOOL_ARGUMENTS_CHARS:,} characters",
    "calls": f"more than {MAX_TOOL_CALLS_READ} tool calls",
}


@pytest.mark.parametrize("kind", sorted(LIMITS))
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_one_turn_past_a_limit_is_a_provider_error(raw: RawLLM, provider: str, kind: str) -> None:
    if provider == "openai":
        events = [chunk({"role": "assistant", "content": ""}), *_openai(kind), "data: [DONE]\n\n"]
    else:
        events = [message_start(), *_anthropic(kind), *message_end()]
    raw.script = [events]
    streamed: list[str] = []
    with pytest.raises(ProviderError, match=LIMITS[kind]):
        _turn(provider, raw, streamed)
    assert sum(map(len, streamed)) <= MAX_TURN_TEXT_CHARS


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_turn_inside_the_limits_is_read_whole(raw: RawLLM, provider: str) -> None:
    text = "y" * (MAX_TURN_TEXT_CHARS - 10)
    arguments: dict[str, Any] = {"tag": "z" * (MAX_TOOL_ARGUMENTS_CHARS - 20)}
    raw.script = [answer(provider, text, [("list_probes", arguments)] * MAX_TOOL_CALLS_READ)]
    streamed: list[str] = []
    turn = _turn(provider, raw, streamed)
    assert turn.text == text and "".join(streamed) == text
    assert len(turn.tool_calls) == MAX_TOOL_CALLS_READ
    assert all(call.arguments == arguments for call in turn.tool_calls)
    assert len({call.id for call in turn.tool_calls}) == MAX_TOOL_CALLS_READ
