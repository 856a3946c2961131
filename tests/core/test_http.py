"""The HTTP contract: error shape everywhere, request ids, headers, probes, metrics, docs."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from fastapi import FastAPI

from legator.core.auth.permissions import Permission
from legator.core.http import protocol
from legator.core.http.deps import require
from legator.core.runtime import Core
from tests.support import LiveServer


def _assert_shape(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text


def test_error_shapes(api: httpx.Client) -> None:
    _assert_shape(api.get("/api/v1/nothing-here"), 404, "not_found")
    _assert_shape(api.put("/api/v1/me"), 405, "method_not_allowed")
    _assert_shape(
        api.post("/api/v1/users", json={"username": "x", "role": "king"}), 422, "validation_error"
    )
    _assert_shape(
        api.post(
            "/api/v1/users", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
        "bad_request",
    )
    big = b'{"username": "' + b"a" * (1024 * 1024 + 10) + b'"}'
    _assert_shape(
        api.post("/api/v1/users", content=big, headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )
    chunked = (big[i : i + 65536] for i in range(0, len(big), 65536))  # no Content-Length
    _assert_shape(
        api.post("/api/v1/users", content=chunked, headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )


def test_unhandled_error_is_500_without_trace(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def add_broken_route(app: FastAPI, _core: Core) -> None:
        @app.get("/boom", dependencies=[require(Permission.PUBLIC)])
        async def boom() -> None:
            raise RuntimeError("secret internals lgk_" + "a" * 64)

    server = LiveServer(tmp_path / "d", customize=add_broken_route).start()
    try:
        with server.client() as client:
            response = client.get("/boom")
            _assert_shape(response, 500, "internal_error")
            assert "secret internals" not in response.text
    finally:
        server.stop()


def test_request_id_is_echoed_or_made(api: httpx.Client) -> None:
    mine = "abc-123-request-id"
    assert api.get("/healthz", headers={"X-Request-ID": mine}).headers["x-request-id"] == mine
    made = api.get("/healthz", headers={"X-Request-ID": "bad id!"}).headers["x-request-id"]
    assert len(made) == 32


def test_security_headers(api: httpx.Client) -> None:
    headers = api.get("/api/v1/me").headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store"
    assert "server" not in headers


def test_health_ready_version(server: LiveServer) -> None:
    with server.client() as anon:
        assert anon.get("/healthz").text == "ok"
        assert anon.get("/readyz").status_code == 200
        version = anon.get("/version").json()
        assert set(version) == {"version", "commit", "date"}


def test_metrics_need_permission_and_count_requests(api: httpx.Client, server: LiveServer) -> None:
    with server.client() as anon:
        _assert_shape(anon.get("/metrics"), 401, "unauthorized")
    api.get("/api/v1/me")
    text = api.get("/metrics").text
    assert 'legator_http_requests_total{method="GET",route="/api/v1/me",status="200"}' in text
    assert "legator_http_request_duration_seconds_bucket" in text
    assert "process_cpu_seconds_total" in text


def test_metrics_can_be_public(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = LiveServer(tmp_path / "d", metrics_public=True).start()
    try:
        with server.client() as anon:
            assert anon.get("/metrics").status_code == 200
    finally:
        server.stop()


def test_openapi_and_docs(server: LiveServer) -> None:
    with server.client() as anon:
        spec = anon.get("/api/v1/openapi.json").json()
        assert "/api/v1/me" in spec["paths"]
        assert "/api/v1/users" in spec["paths"]
        assert "swagger" in anon.get("/api/v1/docs").text.lower()


@pytest.mark.parametrize("path", ["/api/v1/users", "/api/v1/audit", "/api/v1/events"])
def test_api_needs_auth(server: LiveServer, path: str) -> None:
    with server.client() as anon:
        _assert_shape(anon.get(path), 401, "unauthorized")


def _raw(server: LiveServer, data: bytes, *, wait_s: float = 10) -> bytes:
    """Send ``data`` on a fresh connection; whatever comes back until the server closes it."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


def test_a_request_head_is_bounded_in_size(server: LiveServer) -> None:
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    assert _raw(server, huge).startswith(b"HTTP/1.1 400 ")
    fine = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 60_000 + b"\r\n"
    fine += b"Connection: close\r\n\r\n"
    assert _raw(server, fine).startswith(b"HTTP/1.1 200 ")


def test_a_slow_or_silent_head_is_cut_off(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "HEAD_TIMEOUT_S", 0.5)
    started = time.monotonic()
    # Without the cut-off each waits out its 30 s and raises TimeoutError.
    assert _raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", wait_s=30) == b""
    assert _raw(server, b"", wait_s=30) == b""  # never began
    assert time.monotonic() - started < 20
