"""The ``process`` runtime with a real llama.cpp server (llama-cpp-python) on a tiny GGUF:
ready only once healthy, chat through the official openai SDK, stop, death detection,
key never in argv, and reconciliation after a control-plane restart."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from legator.gateway import supervisor
from legator.gateway.runtimes import process
from tests.gateway.backends.conftest import backend, register_managed, wait_state
from tests.support import LiveServer, live_server

pytestmark = pytest.mark.slow


def chat(gw: LiveServer, model: str = "tiny") -> str:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.admin_key, max_retries=0)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    return reply.choices[0].message.content or ""


def test_register_fills_gguf_and_starts_unavailable(admin: httpx.Client, gguf_file: Path) -> None:
    model = register_managed(admin, "tiny", gguf_file)
    assert model["state"] == "unavailable"
    assert model["gguf"]["architecture"] == "llama"
    assert model["gguf"]["block_count"] == 2 and model["gguf"]["head_count_kv"] == 4
    assert backend(admin, "tiny")["state"] == "stopped"
    bad = admin.post(
        "/api/v1/gateway/models",
        json={"id": "bad", "backend_kind": "process", "model_path": "/etc/hostname"},
    )
    assert bad.status_code == 400 and "GGUF" in bad.text
    relative = admin.post(
        "/api/v1/gateway/models",
        json={"id": "bad", "backend_kind": "process", "model_path": "x.gguf"},
    )
    assert relative.status_code == 422


def test_start_chat_stop_with_openai_sdk(
    gw: LiveServer, admin: httpx.Client, gguf_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEGATOR_SIGNING_KEY", "not-for-the-backend")
    monkeypatch.setenv("HF_TOKEN", "hf_notforthebackendeither")
    register_managed(admin, "tiny", gguf_file)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.admin_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as before:
        chat(gw)
    assert before.value.status_code == 503
    started = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
    assert started.status_code == 200, started.text
    status = started.json()
    assert status["state"] == "ready", status
    assert admin.get("/api/v1/gateway/models/tiny").json()["state"] == "ready"
    assert "tiny" in gw.app.state.gateway.scheduler.pools  # type: ignore[union-attr]
    chat(gw)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert list(stream)[-1].choices[0].finish_reason in ("length", "stop")

    # The per-backend key: in a 0600 file, never in the process arguments.
    proc = psutil.Process(status["pid"])
    config = Path(proc.cwd()) / "server.json"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    import json

    key = json.loads(config.read_text())["api_key"]
    assert len(key) == 64
    assert all(key not in part for part in proc.cmdline())
    # Nor any of the control plane's own secrets in its environment.
    environment = proc.environ()
    assert "PATH" in environment
    assert not {"LEGATOR_SIGNING_KEY", "HF_TOKEN"} & environment.keys()
    # The backend is bound to loopback and refuses requests without its key.
    port = status["port"]
    assert all(c.laddr.ip == "127.0.0.1" for c in proc.net_connections() if c.status == "LISTEN")
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401

    again = admin.post("/api/v1/gateway/backends/tiny/start")
    assert again.status_code == 409
    stopped = admin.post("/api/v1/gateway/backends/tiny/stop")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    assert (
        not psutil.pid_exists(status["pid"]) or psutil.Process(status["pid"]).status() == "zombie"
    )
    with pytest.raises(openai.APIStatusError) as after:
        chat(gw)
    assert after.value.status_code == 503
    assert "tiny" not in gw.app.state.gateway.scheduler.pools  # type: ignore[union-attr]
    metrics = admin.get("/metrics").text
    assert (
        'legator_gateway_backend_state{kind="process",model="tiny",state="stopped"} 1.0' in metrics
    )
    logs = admin.get("/api/v1/gateway/backends/tiny/logs", params={"tail": 50})
    assert logs.status_code == 200 and logs.text


def test_trimming_a_log_the_server_appends_to_leaves_no_hole(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("ab") as server:  # how the backend holds it: O_APPEND
        server.write(b"".join(b"line %04d\n" % n for n in range(200)))  # 2,000 bytes
        server.flush()
        process.trim_log(log, 1000)
        kept = (tmp_path / "server.log.1").read_bytes()
        assert kept.endswith(b"line 0199\n") and kept.startswith(b"line ")  # whole lines
        assert 450 <= len(kept) <= 500
        server.write(b"after\n")
        server.flush()
    assert log.read_bytes() == b"after\n"  # at the start, not past 2,000 NUL bytes
    process.trim_log(log, 1000)  # under the limit: left alone
    assert log.read_bytes() == b"after\n"


def test_a_running_backends_log_is_trimmed(
    gw: LiveServer, admin: httpx.Client, gguf_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "LOG_MAX_BYTES", 2_000)
    register_managed(admin, "tiny", gguf_file)
    started = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
    assert started.status_code == 200, started.text
    workdir = Path(psutil.Process(started.json()["pid"]).cwd())
    deadline = time.monotonic() + 15
    while not (workdir / "server.log.1").exists():
        assert time.monotonic() < deadline, "the monitor never trimmed the log"
        chat(gw)  # the server logs every request
        time.sleep(0.5)
    for _ in range(3):
        chat(gw)
    assert b"\0" not in (workdir / "server.log").read_bytes()[:64]
    assert admin.get("/api/v1/gateway/backends/tiny/logs", params={"tail": 5}).text
    admin.post("/api/v1/gateway/backends/tiny/stop")


def test_killed_backend_is_failed_within_10s_and_requests_get_503(
    gw: LiveServer, admin: httpx.Client, gguf_file: Path
) -> None:
    register_managed(admin, "tiny", gguf_file)
    status = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"}).json()
    assert status["state"] == "ready"
    events = gw.core.events.subscribe("gateway.backend.*")  # type: ignore[union-attr]
    os.kill(status["pid"], signal.SIGKILL)
    took = wait_state(admin, "tiny", "failed", timeout=10)
    assert took < 10
    assert backend(admin, "tiny")["error"]
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failed:
        chat(gw)
    # Refused at once, not after waiting out the 30 s queue timeout for it to come back.
    assert failed.value.status_code == 503 and time.monotonic() - began < 15
    published = []
    while not events.queue.empty():
        published.append(events.queue.get_nowait())
    events.close()
    failed_event = next(e for e in published if e.topic == "gateway.backend.failed")
    # The error is for admins (/backends): the core event stream goes to every events:read.
    assert failed_event.data == {"model": "tiny", "kind": "process", "state": "failed"}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_hung_backend_is_failed_within_10s(
    gw: LiveServer, admin: httpx.Client, gguf_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The 10 s by the settings' arithmetic; the run itself with shorter checks, so that a
    # stalled machine is not taken for a slow detection (8 s of 10 by the defaults).
    checks = supervisor.MISSES_TO_FAIL * (
        supervisor.MONITOR_INTERVAL_S + supervisor.HEALTH_TIMEOUT_S
    )
    assert checks < 10
    register_managed(admin, "tiny", gguf_file)
    status = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"}).json()
    monkeypatch.setattr(supervisor, "MONITOR_INTERVAL_S", 0.5)
    monkeypatch.setattr(supervisor, "HEALTH_TIMEOUT_S", 0.5)
    os.kill(status["pid"], signal.SIGSTOP)  # alive, but no longer answering
    try:
        took = wait_state(admin, "tiny", "failed", timeout=20)
        # `failed` is reported only once the process is gone (killed: it could not stop).
        assert gone(status["pid"])
    finally:
        if psutil.pid_exists(status["pid"]):
            os.kill(status["pid"], signal.SIGCONT)
    assert took < 10  # the check under way (2 s), then 2 x (0.5 s + 0.5 s)
    assert "health" in backend(admin, "tiny")["error"]


def test_start_timeout_marks_failed(tmp_path: Path, gguf_file: Path) -> None:
    """A server that never answers health is stopped and failed after the start timeout."""
    silent = tmp_path / "llama-server"
    silent.write_text('#!/bin/sh\necho "$@" > args.txt\nexec sleep 60\n')
    silent.chmod(0o755)
    with (
        live_server(
            tmp_path / "data", gateway_start_timeout_s=1, gateway_llama_server=str(silent)
        ) as gw,
        gw.client(gw.admin_key) as admin,
    ):
        register_managed(admin, "tiny", gguf_file)
        status = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
        body = status.json()
        assert body["state"] == "failed" and "within 1 s" in body["error"]
        assert admin.get("/api/v1/gateway/models/tiny").json()["state"] == "unavailable"
        assert not psutil.pid_exists(body["pid"]) or (
            psutil.Process(body["pid"]).status() == "zombie"
        )
        # llama-server gets its key through a 0600 file, never in its arguments.
        workdir = tmp_path / "data" / "gateway" / "backends" / "tiny"
        args = (workdir / "args.txt").read_text()
        key = (workdir / "api_key").read_text()
        assert len(key) == 64 and key not in args
        assert f"--api-key-file {workdir / 'api_key'}" in args and "-np 1" in args
        assert oct((workdir / "api_key").stat().st_mode & 0o777) == "0o600"


def test_server_exiting_during_start_is_failed(tmp_path: Path, gguf_file: Path) -> None:
    broken = tmp_path / "llama-server"
    broken.write_text("#!/bin/sh\necho 'cannot load model' >&2\nexit 3\n")
    broken.chmod(0o755)
    with (
        live_server(tmp_path / "data", gateway_llama_server=str(broken)) as gw,
        gw.client(gw.admin_key) as admin,
    ):
        register_managed(admin, "tiny", gguf_file)
        body = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"}).json()
        assert body["state"] == "failed" and "exited" in body["error"]
        logs = admin.get("/api/v1/gateway/backends/tiny/logs").text
        assert "cannot load model" in logs


def test_reconcile_adopts_running_and_fails_dead(
    gw: LiveServer, admin: httpx.Client, gguf_file: Path
) -> None:
    register_managed(admin, "tiny", gguf_file)
    register_managed(admin, "other", gguf_file)
    one = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"}).json()
    two = admin.post("/api/v1/gateway/backends/other/start", params={"wait": "true"}).json()
    supervisor = gw.app.state.gateway.supervisor  # type: ignore[union-attr]
    # A crash: the control plane goes away without stopping its backends.
    supervisor.live.clear()
    os.kill(two["pid"], signal.SIGKILL)
    gw.restart()
    supervisor = gw.app.state.gateway.supervisor  # type: ignore[union-attr]
    with gw.client(gw.admin_key) as api:
        assert backend(api, "tiny")["state"] == "ready"
        assert supervisor.live["tiny"].handle.pid == one["pid"]
        chat(gw, "tiny")
        other = backend(api, "other")
        assert other["state"] == "failed" and other["ready"] is False
        assert "other" not in gw.app.state.gateway.scheduler.pools  # type: ignore[union-attr]
    gw.stop()
    assert not psutil.pid_exists(one["pid"]) or psutil.Process(one["pid"]).status() == "zombie"
