"""Running a blocking brain call in the background while the test decides approvals."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from legator.brain.providers import AnthropicProvider, OpenAIProvider
from tests.fleet.e2e.conftest import wait_for


class Background:
    def __init__(self, client: httpx.Client, path: str, body: dict[str, Any]) -> None:
        self.response: httpx.Response | None = None
        self._thread = threading.Thread(
            target=lambda: setattr(self, "response", client.post(path, json=body, timeout=120))
        )
        self._thread.start()

    def result(self, timeout: float = 120) -> httpx.Response:
        self._thread.join(timeout)
        assert self.response is not None, "the call did not finish"
        return self.response


def pending_approval(admin: httpx.Client) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (
            (rows := admin.get("/api/v1/approvals", params={"status": "pending"}).json())
            and rows[0]
        ),
        timeout=60,
    )


def dispatches(admin: httpx.Client) -> list[dict[str, Any]]:
    events = admin.get("/api/v1/audit", params={"action": "fleet.command.dispatch"}).json()
    return list(events["events"])


def record_clients(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every SDK client the providers build from now on (the server runs in this process),
    in the order built."""
    built: list[Any] = []

    def recording(sdk: Any) -> Any:
        def build(**kwargs: Any) -> Any:
            client = sdk(**kwargs)
            built.append(client)
            return client

        return staticmethod(build)

    for provider in (OpenAIProvider, AnthropicProvider):
        monkeypatch.setattr(provider, "sdk", recording(provider.sdk))
    return built
