"""The ``podman`` runtime with real Podman and a llama.cpp server image built locally:
start, chat through the openai SDK, isolation (non-root UID, no capabilities, loopback
port), the key neither in ``podman inspect`` nor in ``ps``, death detection, stop."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from legator.gateway import supervisor as supervisor_module
from tests.gateway.backends.conftest import backend, register_managed, wait_state
from tests.gateway.backends.fake_hub import FakeHub
from tests.gateway.backends.llama_image import build
from tests.gateway.backends.test_hub import REPO, hub, wait_download  # noqa: F401 (fixture)
from tests.support import LiveServer, live_server


def container_exists(name: str) -> bool:
    return subprocess.run(["podman", "container", "exists", name]).returncode == 0


pytestmark = pytest.mark.slow
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:20000", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    old = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(conf)
    try:
        yield build(tmp_path_factory.mktemp("image"))
    finally:
        if old is None:
            os.environ.pop("CONTAINERS_CONF", None)
        else:
            os.environ["CONTAINERS_CONF"] = old


@pytest.fixture
def pgw(tmp_path: Path, image: str) -> Iterator[LiveServer]:
    with live_server(
        tmp_path / "data",
        gateway_podman_image=image,
        gateway_podman_flavour="llama-cpp-python",
        gateway_start_timeout_s=90,
    ) as server:
        yield server


def podman(*args: str) -> str:
    return subprocess.run(["podman", *args], check=True, capture_output=True, text=True).stdout


def test_podman_backend_end_to_end(pgw: LiveServer, gguf_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(gguf_file, models / "tiny.gguf")
    headers = {"Authorization": f"Bearer {pgw.admin_key}"}
    with httpx.Client(base_url=pgw.url, headers=headers, timeout=120) as admin:
        register_managed(admin, "tiny", models / "tiny.gguf", kind="podman")
        status = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
        body = status.json()
        assert status.status_code == 200, body
        logs = admin.get("/api/v1/gateway/backends/tiny/logs").text
        assert body["state"] == "ready", (body, logs)
        assert body["container"] == "sovereign-llamacpp-tiny"

        client = openai.OpenAI(base_url=pgw.url + "/v1", api_key=pgw.admin_key, max_retries=0)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        assert reply.choices[0].finish_reason in ("length", "stop")

        info = json.loads(podman("inspect", "sovereign-llamacpp-tiny"))[0]
        uid = int(info["Config"]["User"].split(":")[0])
        assert 10000 <= uid <= 65000
        assert info["HostConfig"]["CapDrop"] and not info["HostConfig"]["CapAdd"]
        assert info["HostConfig"]["LogConfig"]["Size"] == "67.11MB"  # llama.cpp logs a lot
        bindings = info["HostConfig"]["PortBindings"]["8080/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
        assert any(m["Destination"] == "/models" and not m["RW"] for m in info["Mounts"])
        # The key: not in inspect, not in any process's arguments on this host.
        key = json.loads(
            podman(
                "exec",
                "sovereign-llamacpp-tiny",
                "/opt/py/bin/python3",
                "-c",
                "print(open('/run/secrets/sovereign-llamacpp-tiny-key').read())",
            )
        )["api_key"]
        assert len(key) == 64
        assert key not in json.dumps(info)
        assert key not in subprocess.run(["ps", "auxww"], capture_output=True, text=True).stdout
        assert httpx.get(f"http://127.0.0.1:{body['port']}/v1/models").status_code == 401

        # Killing the container: failed within 10 s, requests get 503.
        podman("kill", "sovereign-llamacpp-tiny")
        took = wait_state(admin, "tiny", "failed", timeout=10)
        assert took < 10
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert failed.value.status_code == 503
        # `failed` is reported only once the container is removed.
        assert not container_exists("sovereign-llamacpp-tiny")

        again = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
        assert again.json()["state"] == "ready"
        stopped = admin.post("/api/v1/gateway/backends/tiny/stop").json()
        assert stopped["state"] == "stopped"
        assert (
            subprocess.run(["podman", "container", "exists", "sovereign-llamacpp-tiny"]).returncode
            == 1
        )
        assert "sovereign-llamacpp-tiny-key" not in podman("secret", "ls")


def test_a_running_container_is_adopted_after_a_control_plane_crash(
    pgw: LiveServer, gguf_file: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(gguf_file, models / "tiny.gguf")
    with pgw.client(pgw.admin_key, timeout=120) as admin:
        register_managed(admin, "tiny", models / "tiny.gguf", kind="podman")
        started = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
        assert started.json()["state"] == "ready", started.text
    pgw.app.state.gateway.supervisor.live.clear()  # type: ignore[union-attr]
    pgw.restart()  # as after a crash: the container kept running meanwhile
    with pgw.client(pgw.admin_key, timeout=120) as admin:
        wait_state(admin, "tiny", "ready", timeout=30)
        supervisor = pgw.app.state.gateway.supervisor  # type: ignore[union-attr]
        assert supervisor.live["tiny"].handle.container == started.json()["container"]
        client = openai.OpenAI(base_url=pgw.url + "/v1", api_key=pgw.admin_key, max_retries=0)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert admin.post("/api/v1/gateway/backends/tiny/stop").json()["state"] == "stopped"


def test_models_whose_ids_differ_by_a_colon_run_side_by_side(
    pgw: LiveServer, gguf_file: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(gguf_file, models / "tiny.gguf")
    with pgw.client(pgw.admin_key, timeout=120) as admin:
        for model_id in ("tiny:1", "tiny-1"):
            register_managed(admin, model_id, models / "tiny.gguf", kind="podman")
            started = admin.post(f"/api/v1/gateway/backends/{model_id}/start?wait=true")
            assert started.json()["state"] == "ready", started.text
        time.sleep(5)  # two monitor rounds: each container still answers its own model
        for model_id in ("tiny:1", "tiny-1"):
            assert backend(admin, model_id)["state"] == "ready", backend(admin, model_id)
            admin.post(f"/api/v1/gateway/backends/{model_id}/stop")


def test_pull_then_serve_with_podman(pgw: LiveServer, hub: FakeHub) -> None:  # noqa: F811
    """Acceptance: from an empty data dir, pull from the hub and serve it in Podman, under
    the packaged unit's umask (0077), which leaves new files to their owner alone."""
    headers = {"Authorization": f"Bearer {pgw.admin_key}"}
    previous_umask = os.umask(0o077)
    try:
        pull_and_serve(pgw, headers)
    finally:
        os.umask(previous_umask)


def pull_and_serve(pgw: LiveServer, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=pgw.url, headers=headers, timeout=120) as admin:
        created = admin.post(
            "/api/v1/gateway/downloads",
            json={"repo": REPO, "model_id": "tiny", "backend_kind": "podman"},
        )
        assert created.status_code == 202, created.text
        assert wait_download(admin, created.json()["id"])["state"] == "completed"
        admin.patch("/api/v1/gateway/models/tiny", json={"runtime_args": {"chat_format": "chatml"}})
        started = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
        assert started.json()["state"] == "ready", started.text
        client = openai.OpenAI(base_url=pgw.url + "/v1", api_key=pgw.admin_key, max_retries=0)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert admin.post("/api/v1/gateway/backends/tiny/stop").json()["state"] == "stopped"
        model = Path(admin.get("/api/v1/gateway/models/tiny").json()["model_path"])
        assert oct(model.stat().st_mode & 0o777) == "0o644"  # what the container reads


def test_start_up_removes_only_its_own_orphan_containers(tmp_path: Path, image: str) -> None:
    """Left-over containers of this control plane (or from before owners were labelled) go;
    another control plane's on the same host (another data directory) stay."""
    data = tmp_path / "data"
    ours = f"{socket.gethostname()}:{data / 'gateway' / 'backends'}"
    labelled = {
        "legator-orphan-ours": ours,
        "legator-orphan-unowned": "",
        "legator-orphan-other": f"{socket.gethostname()}:/srv/other/gateway/backends",
    }
    for name, owner in labelled.items():
        owner_label = ["--label", f"io.legator.owner={owner}"] if owner else []
        podman("create", "--name", name, "--label", "io.legator.backend=x", *owner_label, image)
    try:
        with live_server(data, gateway_podman_image=image):
            assert not container_exists("legator-orphan-ours")
            assert not container_exists("legator-orphan-unowned")
            assert container_exists("legator-orphan-other")
    finally:
        for name in labelled:
            subprocess.run(["podman", "rm", "--force", name], capture_output=True)


def test_a_published_port_taken_meanwhile_is_replaced(
    pgw: LiveServer, gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process binds the port picked for the container before `podman run`: Podman
    refuses it (address already in use) and the start goes on with another port."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(gguf_file, models / "tiny.gguf")
    with socket.socket() as holder, pgw.client(pgw.admin_key, timeout=120) as admin:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = int(holder.getsockname()[1])
        real = supervisor_module._free_port
        picks = [taken]
        monkeypatch.setattr(
            supervisor_module, "_free_port", lambda: picks.pop() if picks else real()
        )
        register_managed(admin, "tiny", models / "tiny.gguf", kind="podman")
        started = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
        assert started.status_code == 200, started.text
        assert started.json()["state"] == "ready", started.text
        assert started.json()["port"] != taken
        assert admin.post("/api/v1/gateway/backends/tiny/stop").json()["state"] == "stopped"


def test_shutdown_removes_every_container(pgw: LiveServer, gguf_file: Path, tmp_path: Path) -> None:
    """The backends are stopped all at once at shutdown: each container and its secret is
    still removed before the backend is recorded stopped."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(gguf_file, models / "tiny.gguf")
    names = ("tiny-a", "tiny-b")
    with pgw.client(pgw.admin_key, timeout=120) as admin:
        for model_id in names:
            register_managed(admin, model_id, models / "tiny.gguf", kind="podman")
            started = admin.post(f"/api/v1/gateway/backends/{model_id}/start?wait=true")
            assert started.json()["state"] == "ready", started.text
        supervisor = pgw.app.state.gateway.supervisor  # type: ignore[union-attr]
        pgw.call(supervisor.shutdown())
        for model_id in names:
            assert not container_exists(f"sovereign-llamacpp-{model_id}")
            assert backend(admin, model_id)["state"] == "stopped"
        assert "sovereign-llamacpp-tiny" not in podman("secret", "ls")
