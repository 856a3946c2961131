"""Schemathesis over the OpenAPI schema: whatever a client sends, the server never answers
with a 5xx and every error keeps the documented shape."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from legator.app import create_app
from legator.core.config import Settings
from tests.gateway.backends.fake_hub import FakeHub
from tests.support import LiveServer, live_server

STREAMING = ("/api/v1/events",)  # endless by design: exercised by test_events instead
NEEDS_LLM = {
    "/api/v1/probes/{probe_id}/task",
    "/api/v1/probes/{probe_id}/chat",
    "/api/v1/fleet/chat",
}
schema = schemathesis.openapi.from_dict(
    create_app(Settings(data_dir=Path("/nonexistent"))).openapi()
).exclude(path=STREAMING)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # The gateway's hub endpoints talk to HF_ENDPOINT: point them at the local fake hub (the
    # real one is unreachable here, and an unreachable upstream is rightly a 503).
    hub = FakeHub().start()
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = hub.url
    try:
        with live_server(tmp_path_factory.mktemp("fuzz")) as server:
            yield server
    finally:
        hub.stop()
        if old is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = old


@schema.parametrize()
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_server_errors(case: schemathesis.Case, fuzz_server: LiveServer) -> None:
    response = case.call(
        base_url=fuzz_server.url, headers={"Authorization": f"Bearer {fuzz_server.admin_key}"}
    )
    if response.status_code == 503 and case.operation.path in NEEDS_LLM:
        # No LLM provider on this server: the documented 503 that says how to configure one.
        assert "LEGATOR_LLM_PROVIDER" in response.json()["error"]["message"]
    else:
        case.validate_response(response, checks=[not_a_server_error])
    content_type = str(response.headers.get("content-type", ""))
    if response.status_code < 400 or "application/json" not in content_type:
        return
    body = response.json()
    if case.path == "/v1/messages":  # Anthropic's shape
        assert body["type"] == "error" and body["error"]["type"] and body["error"]["message"]
    elif case.path.startswith("/v1/"):  # OpenAI's shape
        assert body["error"]["message"] and body["error"]["type"]
    else:
        error = body["error"]
        assert error["code"] and error["message"] and error["request_id"]
