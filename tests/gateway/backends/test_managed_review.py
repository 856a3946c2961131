"""Managed backends under attack and misuse: crafted GGUF headers, a hub that sends a file
that is no model or more bytes than it listed, a model id refused only after the transfer, a
mirror's credentials in an error, a model deleted or a backend stopped while it starts, a
backend still loading when the control plane restarts, and container names that two model
ids could share."""

from __future__ import annotations

import asyncio
import re
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from legator.gateway.gguf import GGUFError, read_metadata
from legator.gateway.runtimes.base import Handle, Launch
from legator.gateway.runtimes.podman import PodmanRuntime
from legator.gateway.runtimes.process import ProcessRuntime
from tests.gateway.backends.conftest import register_managed, wait_state
from tests.gateway.backends.fake_hub import FakeHub
from tests.gateway.backends.test_hub import REPO, wait_download
from tests.support import LiveServer, live_server

STRING, ARRAY, UINT32 = 8, 9, 4


# ----- crafted GGUF headers ------------------------------------------------------------------


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _key(name: str, value_type: int, value: bytes) -> bytes:
    return _string(name.encode()) + struct.pack("<I", value_type) + value


def _gguf(*keys: bytes, tensors: int = 0) -> bytes:
    architecture = _key("general.architecture", STRING, _string(b"llama"))
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(keys) + 1) + architecture + b"".join(keys)


def _written(tmp_path: Path, data: bytes, name: str = "crafted.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _refused(path: Path, what: str) -> None:
    try:
        read_metadata(path)
    except GGUFError as exc:
        assert path.name in str(exc), exc
    except Exception as exc:
        pytest.fail(f"{what}: {exc!r} instead of a GGUFError")
    else:
        pytest.fail(f"{what}: accepted")


def test_a_crafted_header_is_a_gguf_error_not_a_crash(tmp_path: Path) -> None:
    nested = struct.pack("<IQ", ARRAY, 1) * 5000 + struct.pack("<IQ", UINT32, 0)
    crafted = {
        "nested arrays": _gguf(_key("x", ARRAY, nested)),
        "a string for a number": _gguf(_key("llama.block_count", STRING, _string(b"many"))),
        "unknown value type": _gguf(_key("x", 99, b"")),
        "a string longer than the file": _gguf(_key("x", STRING, struct.pack("<Q", 2**40))),
        "tensors never described": _gguf(tensors=3),
        "an array longer than the file": _gguf(_key("x", ARRAY, struct.pack("<IQ", 10, 2**61))),
    }
    for what, data in crafted.items():
        _refused(_written(tmp_path, data), what)


def test_every_truncation_of_a_model_header_is_a_gguf_error(
    tmp_path: Path, gguf_file: Path
) -> None:
    data = gguf_file.read_bytes()
    header_end = data.index(b"token_embd")  # the tensor descriptions start about here
    for size in range(0, header_end + 200, 37):
        _refused(_written(tmp_path, data[:size]), f"truncated at {size} bytes")


def test_a_header_of_millions_of_strings_is_refused_quickly(tmp_path: Path) -> None:
    count = 3_000_000  # 24 MB of empty strings; the gguf package makes objects for each
    strings = struct.pack("<IQ", STRING, count) + bytes(8 * count)
    path = _written(tmp_path, _gguf(_key("tokenizer.ggml.tokens", ARRAY, strings)))
    # The fastest of three: a stall of the machine during one is not the reader's.
    assert min(_refusal_s(path, match="strings") for _ in range(3)) < 3


def _refusal_s(path: Path, *, match: str) -> float:
    """Seconds until ``read_metadata`` refuses ``path`` with a message matching ``match``."""
    began = time.monotonic()
    with pytest.raises(GGUFError, match=match):
        read_metadata(path)
    return time.monotonic() - began


def test_a_truncated_model_file_is_refused_with_400(
    admin: httpx.Client, gguf_file: Path, tmp_path: Path
) -> None:
    data = gguf_file.read_bytes()
    key = b"tokenizer.ggml.tokens"
    # A partial copy, ending just after a key's name.
    cut = _written(tmp_path, data[: data.index(key) + len(key)], "cut.gguf")
    body = {"id": "cut", "backend_kind": "process", "model_path": str(cut)}
    answer = admin.post("/api/v1/gateway/models", json=body)
    assert answer.status_code == 400, answer.text
    assert "cut.gguf" in answer.json()["error"]["message"]


# ----- downloads -----------------------------------------------------------------------------


@pytest.fixture
def hub(gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(REPO, {"tiny-q8.gguf": gguf_file.read_bytes()})
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield fake
    fake.stop()


def test_a_download_that_is_no_model_leaves_nothing_behind(
    gw: LiveServer,
    admin: httpx.Client,
    hub: FakeHub,
    gguf_file: Path,
) -> None:
    hub.add("acme/broken-GGUF", {"m.gguf": b"GGUF but nothing a model needs" * 100})
    first = admin.post("/api/v1/gateway/downloads", json={"repo": "acme/broken-GGUF"})
    assert first.status_code == 202, first.text
    failed = wait_download(admin, first.json()["id"])
    assert failed["state"] == "failed" and "GGUF" in failed["error"], failed
    models_dir = gw.data_dir / "gateway" / "models"  # type: ignore[operator]
    assert not [p for p in models_dir.rglob("*") if p.is_file()]
    # The repository is fixed: downloading it again is not refused as "already downloaded".
    hub.repos["acme/broken-GGUF"].files["m.gguf"] = gguf_file.read_bytes()
    again = admin.post("/api/v1/gateway/downloads", json={"repo": "acme/broken-GGUF"})
    assert again.status_code == 202, again.text
    assert wait_download(admin, again.json()["id"])["state"] == "completed"
    assert admin.get("/api/v1/gateway/models/m").json()["gguf"]["architecture"] == "llama"


def test_a_download_for_a_model_id_the_catalogue_would_refuse_is_a_clear_422(
    gw: LiveServer,
    admin: httpx.Client,
    hub: FakeHub,
) -> None:
    for model_id in ("has spaces", "../up", "-dash-first", "x" * 101, ""):
        body = {"repo": REPO, "model_id": model_id}
        answer = admin.post("/api/v1/gateway/downloads", json=body)
        assert answer.status_code == 422, (model_id, answer.text)
        assert "model_id" in answer.text
    assert admin.get("/api/v1/gateway/downloads").json() == []
    assert hub.sent == 0  # refused before a byte was fetched


def test_a_hub_sending_more_than_it_listed_is_cut_off(
    gw: LiveServer,
    admin: httpx.Client,
    hub: FakeHub,
) -> None:
    hub.pad = 64 << 20  # a stream without end, for a disk: the file is listed at 0.5 MB
    hub.trickle = (64 * 1024, 0.001)  # pauses in which the hub notices a closed connection
    created = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "model_id": "big"})
    assert created.status_code == 202, created.text
    listed = created.json()["total_bytes"]
    failed = wait_download(admin, created.json()["id"], timeout=120)
    assert hub.sent < listed + (16 << 20), f"{hub.sent} bytes fetched for {listed} listed"
    assert failed["state"] == "failed" and "more than" in failed["error"], failed
    models_dir = gw.data_dir / "gateway" / "models"  # type: ignore[operator]
    assert not [p for p in models_dir.rglob("*") if p.is_file()]


def test_a_file_listed_without_a_size_is_not_fetched(
    gw: LiveServer, admin: httpx.Client, hub: FakeHub
) -> None:
    hub.add("acme/sizeless-GGUF", {"m.gguf": b""})  # listed at 0 bytes: no bound to hold it to
    hub.pad = 64 << 20
    hub.trickle = (64 * 1024, 0.001)
    answer = admin.post("/api/v1/gateway/downloads", json={"repo": "acme/sizeless-GGUF"})
    assert answer.status_code == 400, answer.text
    assert "size" in answer.json()["error"]["message"]
    assert hub.sent == 0


def test_a_failed_download_names_no_mirror_credentials(
    admin: httpx.Client,
    hub: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://mirror:MIRRORPASS@127.0.0.1:{hub.port}")
    hub.gone.add("tiny-q8.gguf")  # listed, but its transfer answers 404
    created = admin.post("/api/v1/gateway/downloads", json={"repo": REPO})
    assert created.status_code == 202, created.text
    failed = wait_download(admin, created.json()["id"])
    assert failed["state"] == "failed" and "404" in failed["error"], failed
    assert "MIRRORPASS" not in failed["error"]
    assert "MIRRORPASS" not in admin.get("/api/v1/gateway/downloads").text


# ----- start and delete --------------------------------------------------------------------


class SlowStart(ProcessRuntime):
    """The process runtime with a launch as slow as a container's: the window of the race."""

    def __init__(self, server: str, delay_s: float) -> None:
        super().__init__(server)
        self.delay_s = delay_s
        self.pids: list[int] = []

    async def start(self, launch: Launch) -> Handle:
        await asyncio.sleep(self.delay_s)
        handle = await super().start(launch)
        assert handle.pid is not None
        self.pids.append(handle.pid)
        return handle


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def silent_server(tmp_path: Path) -> Iterator[Path]:
    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    yield script


def test_a_model_deleted_while_its_backend_starts_leaves_no_process(
    gw: LiveServer, admin: httpx.Client, gguf_file: Path, silent_server: Path
) -> None:
    supervisor = gw.app.state.gateway.supervisor  # type: ignore[union-attr]
    runtime = SlowStart(str(silent_server), delay_s=1.5)
    supervisor.add_runtime(runtime)
    register_managed(admin, "tiny", gguf_file)
    answers: list[httpx.Response] = []

    def start() -> None:
        with gw.client(gw.admin_key) as client:
            answers.append(client.post("/api/v1/gateway/backends/tiny/start"))

    starting = threading.Thread(target=start)
    starting.start()
    time.sleep(0.5)
    assert admin.delete("/api/v1/gateway/models/tiny").status_code == 204
    starting.join(timeout=30)
    assert runtime.pids, "the runtime never launched"
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for pid in runtime.pids):
        assert time.monotonic() < deadline, f"backend processes left running: {runtime.pids}"
        time.sleep(0.1)
    assert "tiny" not in supervisor.live
    assert answers[0].status_code == 409, answers[0].text
    assert "deleted while its backend started" in answers[0].json()["error"]["message"]


def test_a_stop_during_a_slow_start_stops_the_backend(
    gw: LiveServer, admin: httpx.Client, gguf_file: Path, silent_server: Path
) -> None:
    supervisor = gw.app.state.gateway.supervisor  # type: ignore[union-attr]
    runtime = SlowStart(str(silent_server), delay_s=1.5)
    supervisor.add_runtime(runtime)
    register_managed(admin, "tiny", gguf_file)
    starting = threading.Thread(target=admin.post, args=("/api/v1/gateway/backends/tiny/start",))
    starting.start()
    time.sleep(0.5)
    with gw.client(gw.admin_key) as other:
        stopped = other.post("/api/v1/gateway/backends/tiny/stop")
    starting.join(timeout=30)
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text
    assert runtime.pids and all(_gone(pid) for pid in runtime.pids)


async def test_a_killed_process_is_gone_and_reaped_when_stop_returns(tmp_path: Path) -> None:
    """A process with much memory (a model) takes a while to exit after SIGKILL: `failed` or
    `stopped` must not be reported while it still holds that memory, nor leave a zombie."""
    runtime = ProcessRuntime()
    big = "import time; b = bytearray(b'x') * (3 << 30); open('ready', 'w').close(); time.sleep(60)"
    child = await asyncio.to_thread(runtime._spawn, [sys.executable, "-c", big], tmp_path)
    runtime.children[child.pid] = child
    handle = Handle(pid=child.pid, pid_started=psutil.Process(child.pid).create_time())
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and child.poll() is None, "it never got its memory"
        await asyncio.sleep(0.1)
    await runtime.stop(handle, grace_s=0)
    exited = child.returncode  # set only once reaped; poll() here would reap it itself
    child.kill()
    child.wait()
    assert exited is not None, "stop returned while the process was still exiting"


SLOW_LOADING_SERVER = """#!{python}
import http.server, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
time.sleep(4)  # loading its model


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{{}}")

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def test_a_backend_still_loading_at_a_restart_is_adopted_not_killed(
    tmp_path: Path, gguf_file: Path
) -> None:
    server = tmp_path / "llama-server"
    server.write_text(SLOW_LOADING_SERVER.format(python=sys.executable))
    server.chmod(0o755)
    settings = {"gateway_llama_server": str(server), "gateway_start_timeout_s": 30}
    with live_server(tmp_path / "data", **settings) as gw:
        with gw.client(gw.admin_key) as admin:
            register_managed(admin, "tiny", gguf_file)
            started = admin.post("/api/v1/gateway/backends/tiny/start").json()
            assert started["state"] == "starting", started
        # The control plane crashes while the model loads: it does not stop its backends.
        gw.app.state.gateway.supervisor.live.clear()  # type: ignore[union-attr]
        gw.restart()
        with gw.client(gw.admin_key) as admin:
            wait_state(admin, "tiny", "ready", timeout=20)
            supervisor = gw.app.state.gateway.supervisor  # type: ignore[union-attr]
            assert supervisor.live["tiny"].handle.pid == started["pid"]
    assert _gone(started["pid"])


# ----- Podman names --------------------------------------------------------------------------


def test_distinct_model_ids_get_distinct_valid_container_names() -> None:
    ids = ["m:1", "m-1", "m_1", "m__1", "m_-1", "m:_1", "a:b:c", "a-b_c"]
    names = [PodmanRuntime.name(model_id) for model_id in ids]
    assert len(set(names)) == len(ids), names
    assert all(re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name) for name in names)
    assert PodmanRuntime.name("tiny") == "sovereign-llamacpp-tiny"
