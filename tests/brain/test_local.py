"""Probe chat through the ``local`` provider: the gateway's own model (a real llama.cpp
server, llama-cpp-python, on a tiny random-weight GGUF) called in-process with the brain's
service identity. The text is gibberish; the plumbing (admission, usage, tools offered,
session) is what is checked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from legator.brain.local import LocalProvider
from legator.brain.providers import ProviderError
from tests.fleet.e2e.conftest import ProbeProcess, wait_for
from tests.gateway.conftest import register
from tests.gateway.llama_server import llama_server
from tests.gateway.scripted_upstream import ScriptedUpstream
from tests.support import LiveServer, live_server

pytestmark = pytest.mark.slow


@pytest.fixture
def llama_url(tmp_path: Path) -> Iterator[str]:
    with llama_server(tmp_path / "llama.log", n_ctx=8192) as url:
        yield url


@pytest.fixture
def local_server(tmp_path: Path, llama_url: str) -> Iterator[LiveServer]:
    with (
        live_server(
            tmp_path / "data",
            llm_provider="local",
            llm_model="tiny",
            brain_max_tokens=16,
            brain_max_steps=2,
        ) as server,
        server.client(server.admin_key) as api,
    ):
        register(api, "tiny", llama_url, name="Tiny llama", context_length=8192)
        yield server


def test_probe_chat_through_the_local_gateway_model(
    local_server: LiveServer, tmp_path: Path
) -> None:
    with local_server.client(local_server.admin_key) as admin:
        token = admin.post("/api/v1/tokens").json()["token"]
        probe = ProbeProcess(local_server, tmp_path / "cfg", tmp_path / "probe.log")
        assert probe.init(token, hostname="local-a").returncode == 0
        probe.start()
        try:
            wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
            response = admin.post(
                f"/api/v1/probes/{probe.probe_id}/chat", json={"message": "hello"}, timeout=120
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["status"] in ("completed", "step_limit"), body["error"]
            assert body["steps"] and body["usage"]["output_tokens"] >= 1
            local_server.call(local_server.app.state.gateway.recorder.flush())  # type: ignore[union-attr]
            usage = admin.get("/api/v1/gateway/usage/all", params={"period": "hour"}).json()
            assert usage["requests"] == len(body["steps"])
            # Attributed to the brain's service identity, not to the chatting user.
            assert [row["group"] for row in usage["by_user"]] == ["legator-brain"]
            assert usage["by_user"][0]["input_tokens"] == body["usage"]["input_tokens"]
        finally:
            probe.stop()


# ----- the provider itself, against the gateway's scripted upstream --------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def scripted_gateway(tmp_path: Path, upstream: ScriptedUpstream) -> Iterator[LiveServer]:
    with live_server(tmp_path / "data") as server, server.client(server.admin_key) as api:
        for mode in ("echo", "tools", "die"):
            register(api, mode, upstream.url, upstream_model=mode)
        yield server


def _turn(server: LiveServer, model: str, tools: list[dict[str, Any]] | None = None) -> Any:
    provider = LocalProvider(server.app.state.gateway, model, max_tokens=64)  # type: ignore[union-attr]
    tokens: list[str] = []

    async def on_token(text: str) -> None:
        tokens.append(text)

    messages = [{"role": "user", "content": "one two three"}]
    return server.call(provider.turn("be brief", messages, tools or [], on_token)), tokens


def test_the_local_provider_streams_tokens_as_the_model_produces_them(
    scripted_gateway: LiveServer,
) -> None:
    turn, tokens = _turn(scripted_gateway, "echo")
    assert turn.text == "echo: one two three"
    assert len(tokens) > 1 and "".join(tokens) == turn.text  # token by token, not at the end
    assert turn.output_tokens == 4 and turn.input_tokens > 0  # the upstream's own usage
    assert scripted_gateway.app.state.gateway.scheduler.pools["echo"].in_use == 0  # type: ignore[union-attr]


def test_the_local_provider_assembles_streamed_tool_calls(scripted_gateway: LiveServer) -> None:
    weather = {"name": "weather", "description": "the weather", "parameters": {"type": "object"}}
    turn, _tokens = _turn(scripted_gateway, "tools", [weather])
    assert [(c.id, c.name, c.arguments) for c in turn.tool_calls] == [
        ("call_1", "weather", {"city": "Paris"})
    ]


def test_a_stream_that_dies_is_a_provider_error_and_frees_the_slot(
    scripted_gateway: LiveServer,
) -> None:
    with pytest.raises(ProviderError, match="stream"):
        _turn(scripted_gateway, "die")
    assert scripted_gateway.app.state.gateway.scheduler.pools["die"].in_use == 0  # type: ignore[union-attr]
