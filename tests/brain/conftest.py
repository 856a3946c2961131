"""A real control plane whose LLM provider is the scripted test server, and real probes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brain.llm_server import ScriptedLLM
from tests.fleet.e2e.conftest import admin, spawn_probe  # noqa: F401  (fixtures reused)
from tests.support import LiveServer, live_server


@pytest.fixture
def llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as server:
        yield server


@pytest.fixture(params=["openai", "anthropic"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fleet_server(tmp_path: Path, llm: ScriptedLLM, provider: str) -> Iterator[LiveServer]:
    base_url = f"{llm.url}/v1" if provider == "openai" else llm.url
    with live_server(
        tmp_path / "data",
        fleet_offline_after_s=4,
        fleet_flush_interval_s=0.3,
        fleet_command_grace_s=3,
        llm_provider=provider,
        llm_model="scripted-model",
        llm_api_key="sk-test",
        llm_base_url=base_url,
    ) as server:
        yield server
