"""Hub search and listings through huggingface_hub against a local fake hub, background
downloads with progress, an interrupted transfer, cancel, 409/507 guards, resume after a
control-plane restart, and the acceptance path: pull → start (process) → chat → stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.backends.fake_hub import FakeHub
from tests.support import LiveServer, live_server

REPO = "acme/tiny-GGUF"


@pytest.fixture
def hub(gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub()
    data = gguf_file.read_bytes()
    fake.add(REPO, {"tiny-q8.gguf": data, "README.md": b"# tiny\n"}, downloads=10)
    fake.add("acme/two-GGUF", {"a.gguf": data, "b.gguf": data}, downloads=5)
    fake.add("acme/text-only", {"model.safetensors": b"x" * 10}, tags=["text-generation"])
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield fake
    fake.stop()


def wait_download(admin: httpx.Client, download_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = admin.get(f"/api/v1/gateway/downloads/{download_id}").json()
        if row["state"] not in ("queued", "running"):
            return row  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, row
        time.sleep(0.1)


def test_search_and_files(admin: httpx.Client, hub: FakeHub) -> None:
    found = admin.get("/api/v1/gateway/hub/search", params={"q": "gguf"}).json()
    assert [m["id"] for m in found] == [REPO, "acme/two-GGUF"]
    paged = admin.get("/api/v1/gateway/hub/search", params={"limit": 1, "offset": 1}).json()
    assert [m["id"] for m in paged] == ["acme/two-GGUF"]
    everything = admin.get("/api/v1/gateway/hub/search", params={"gguf": "false"}).json()
    assert "acme/text-only" in [m["id"] for m in everything]
    files = admin.get("/api/v1/gateway/hub/files", params={"repo": REPO}).json()
    assert [(f["path"], f["gguf"]) for f in files] == [
        ("README.md", False),
        ("tiny-q8.gguf", True),
    ]
    assert files[1]["size"] == len(hub.repos[REPO].files["tiny-q8.gguf"])
    missing = admin.get("/api/v1/gateway/hub/files", params={"repo": "acme/nope"})
    assert missing.status_code == 404
    no_revision = admin.get("/api/v1/gateway/hub/files", params={"repo": REPO, "revision": "v9"})
    assert no_revision.status_code == 404
    assert "no revision 'v9'" in no_revision.json()["error"]["message"]
    unrouted = admin.get("/api/v1/gateway/hub/files", params={"repo": REPO, "revision": "/x"})
    assert unrouted.status_code == 404
    bad = admin.get("/api/v1/gateway/hub/files", params={"repo": "../etc"})
    assert bad.status_code == 422


def test_pull_start_chat_stop_from_empty_data_dir(
    gw: LiveServer, admin: httpx.Client, hub: FakeHub
) -> None:
    hub.drop_after = 100_000  # the first transfer breaks part-way: the download resumes
    created = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "model_id": "tiny"})
    assert created.status_code == 202, created.text
    done = wait_download(admin, created.json()["id"])
    assert done["state"] == "completed", done
    assert done["done_bytes"] == done["total_bytes"] and done["percent"] == 100
    assert hub.ranges[0] == "" and hub.ranges[1] == "bytes=100000-"
    model = admin.get("/api/v1/gateway/models/tiny").json()
    assert model["backend_kind"] == "process" and model["source_repo"] == REPO
    assert model["gguf"]["architecture"] == "llama" and model["context_length"] == 512
    assert not list(Path(model["model_path"]).parent.glob("*.part"))
    again = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "model_id": "tiny2"})
    assert again.status_code == 409

    admin.patch("/api/v1/gateway/models/tiny", json={"runtime_args": {"chat_format": "chatml"}})
    started = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"}).json()
    assert started["state"] == "ready", started
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.admin_key, max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert admin.post("/api/v1/gateway/backends/tiny/stop").json()["state"] == "stopped"


def test_download_errors_and_guards(admin: httpx.Client, gw: LiveServer, hub: FakeHub) -> None:
    several = admin.post("/api/v1/gateway/downloads", json={"repo": "acme/two-GGUF"})
    assert several.status_code == 400 and "a.gguf" in several.text
    none = admin.post("/api/v1/gateway/downloads", json={"repo": "acme/text-only"})
    assert none.status_code == 400
    not_gguf = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "file": "README.md"})
    assert not_gguf.status_code == 400
    escape = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "file": "../x.gguf"})
    assert escape.status_code == 422
    for revision in ("../../..", "main/../..", "/tmp"):
        climbing = admin.post(
            "/api/v1/gateway/downloads", json={"repo": REPO, "revision": revision}
        )
        assert climbing.status_code == 422, revision
    # A hostile hub (or mirror) lists a path outside the repository: it is never written.
    hub.add("acme/hostile-GGUF", {"../../../escaped.gguf": b"not a gguf"})
    hostile = admin.post("/api/v1/gateway/downloads", json={"repo": "acme/hostile-GGUF"})
    assert hostile.status_code == 400 and "outside" in hostile.json()["error"]["message"]
    missing = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "file": "no.gguf"})
    assert missing.status_code == 404
    downloads = gw.app.state.gateway.downloads  # type: ignore[union-attr]
    downloads.refuse_percent = 0.0  # any disk is "full"
    full = admin.post("/api/v1/gateway/downloads", json={"repo": REPO})
    assert full.status_code == 507 and full.json()["error"]["code"] == "insufficient_storage"
    downloads.refuse_percent, downloads.warn_percent = 100.0, 0.0
    hub.trickle = (16 * 1024, 0.05)
    warned = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "model_id": "w"})
    assert warned.status_code == 202 and "full" in warned.json()["warning"]
    dup = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "model_id": "w2"})
    assert dup.status_code == 409 and "already being downloaded" in dup.text
    time.sleep(0.5)
    progress = admin.get(f"/api/v1/gateway/downloads/{warned.json()['id']}").json()
    assert 0 < progress["done_bytes"] < progress["total_bytes"]
    assert progress["rate_bytes_s"] > 0 and progress["eta_s"] is not None
    cancelled = admin.post(f"/api/v1/gateway/downloads/{warned.json()['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    models_dir = gw.data_dir / "gateway" / "models"  # type: ignore[operator]
    assert not list(models_dir.rglob("*.part")) and not list(models_dir.rglob("*.gguf"))
    assert admin.get("/api/v1/gateway/models/w").status_code == 404


def test_restart_mid_download_completes_afterwards(tmp_path: Path, hub: FakeHub) -> None:
    hub.trickle = (16 * 1024, 0.05)  # ~3 s for the tiny model
    with live_server(tmp_path / "data") as gw, gw.client(gw.admin_key) as admin:
        created = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "model_id": "t"})
        assert created.status_code == 202
        download_id = created.json()["id"]
        deadline = time.monotonic() + 10
        while admin.get(f"/api/v1/gateway/downloads/{download_id}").json()["done_bytes"] < 64_000:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # A stray partial file from some earlier crash: cleaned at start, never a model.
        stray = tmp_path / "data" / "gateway" / "models" / "old__x" / "main" / "y.gguf.part"
        stray.parent.mkdir(parents=True)
        stray.write_bytes(b"partial")
        gw.restart()
        hub.trickle = None
        with gw.client(gw.admin_key) as again:
            done = wait_download(again, download_id)
            assert done["state"] == "completed", done
            resumed = [r for r in hub.ranges if r]
            assert resumed and int(resumed[-1][6:].split("-")[0]) >= 64_000
            assert again.get("/api/v1/gateway/models/t").json()["gguf"]["block_count"] == 2
        assert not stray.exists()


def test_an_unreachable_mirror_is_named_without_its_credentials(
    admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror:MIRRORPASS@127.0.0.1:1")
    for path, params in (("search", {"q": "gguf"}), ("files", {"repo": REPO})):
        answer = admin.get(f"/api/v1/gateway/hub/{path}", params=params)
        assert answer.status_code == 503, answer.text
        assert "http://mirror:***@127.0.0.1:1" in answer.text and "MIRRORPASS" not in answer.text
