"""`legator models pull|list|show|rm` and `legator backends start|logs|stop` against a live
control plane and the fake hub, as an operator runs them."""

from __future__ import annotations

import json

import httpx

from tests.gateway.backends.fake_hub import FakeHub
from tests.gateway.backends.test_hub import REPO, hub  # noqa: F401 (fixture)
from tests.support import LiveServer, run_cli


def test_cli_pull_start_logs_stop_rm(gw: LiveServer, admin: httpx.Client, hub: FakeHub) -> None:  # noqa: F811
    env = {"LEGATOR_SERVER_URL": gw.url, "LEGATOR_API_KEY": gw.admin_key}
    hub.trickle = (64 * 1024, 0.1)
    pulled = run_cli("legator", "models", "pull", REPO, "--id", "tiny", env=env)
    assert pulled.returncode == 0, pulled.stderr + pulled.stdout
    assert "model tiny registered" in pulled.stdout and "tiny-q8.gguf" in pulled.stdout
    assert "475.9/475.9 kB" in pulled.stdout  # the bar reached the full size
    again = run_cli("legator", "models", "pull", REPO, "--id", "tiny2", env=env)
    assert again.returncode == 4 and "already downloaded" in again.stderr
    listed = run_cli("legator", "models", "list", "--json", env=env)
    assert [m["id"] for m in json.loads(listed.stdout)] == ["tiny"]
    # A viewer's listing has no backend URL or file path to show, and needs none.
    external = {"id": "ext", "backend_url": "http://127.0.0.1:9/v1"}  # no source repository
    assert admin.post("/api/v1/gateway/models", json=external).status_code == 201
    viewer = {"username": "vic", "password": "correct horse battery", "role": "viewer"}
    assert admin.post("/api/v1/users", json=viewer).status_code == 201
    viewer_key = admin.post("/api/v1/keys", json={"name": "cli", "user": "vic"}).json()["key"]
    as_viewer = run_cli("legator", "models", "list", env={**env, "LEGATOR_API_KEY": viewer_key})
    assert as_viewer.returncode == 0 and "ext" in as_viewer.stdout, as_viewer.stderr
    shown = run_cli("legator", "models", "show", "tiny", env=env)
    assert "gguf.architecture" in shown.stdout and "estimate.total_bytes" in shown.stdout
    admin.patch("/api/v1/gateway/models/tiny", json={"runtime_args": {"chat_format": "chatml"}})
    started = run_cli("legator", "backends", "start", "tiny", env=env)
    assert started.returncode == 0 and "tiny: ready" in started.stdout, started.stderr
    logs = run_cli("legator", "backends", "logs", "tiny", "-n", "5", env=env)
    assert logs.returncode == 0 and logs.stdout.strip()
    stopped = run_cli("legator", "backends", "stop", "tiny", env=env)
    assert stopped.returncode == 0 and "tiny: stopped" in stopped.stdout
    twice = run_cli("legator", "backends", "stop", "tiny", env=env)
    assert twice.returncode == 4
    removed = run_cli("legator", "models", "rm", "tiny", env=env)
    assert removed.returncode == 0
    missing = run_cli("legator", "models", "show", "tiny", env=env)
    assert missing.returncode == 3
