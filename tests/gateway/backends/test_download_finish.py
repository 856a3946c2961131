"""The end of a download: its file takes its name, then the model is registered. A cancel or
a control-plane stop landing in between must not leave the file on disk with no model
pointing at it: the download finishes first (and a cancel gets 409: it is completed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

from legator.gateway.gguf import GGUFInfo
from legator.gateway.models import GatewayDownload
from tests.gateway.backends.fake_hub import FakeHub
from tests.gateway.backends.test_hub import REPO, hub, wait_download  # noqa: F401 (fixture)
from tests.support import LiveServer, live_server

Register = Callable[[GatewayDownload, Path, GGUFInfo], Coroutine[Any, Any, str | None]]


def slowed(downloads: Any, entered: threading.Event, delay_s: float = 1.0) -> None:
    """Widen the window between the file's final rename and its registration."""
    original: Register = downloads._register

    async def register(row: GatewayDownload, dest: Path, info: GGUFInfo) -> str | None:
        assert dest.is_file()  # renamed: no longer a .part
        entered.set()
        await asyncio.sleep(delay_s)
        return await original(row, dest, info)

    downloads._register = register


def model_files(gw: LiveServer) -> list[Path]:
    models_dir = gw.data_dir / "gateway" / "models"  # type: ignore[operator]
    return sorted(p for p in models_dir.rglob("*") if p.is_file())


def test_a_cancel_between_rename_and_registration_leaves_no_stray_file(
    gw: LiveServer,
    admin: httpx.Client,
    hub: FakeHub,  # noqa: F811
) -> None:
    entered = threading.Event()
    slowed(gw.app.state.gateway.downloads, entered)  # type: ignore[union-attr]
    created = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "model_id": "tiny"})
    assert created.status_code == 202, created.text
    download_id = created.json()["id"]
    assert entered.wait(30), "the download never reached its registration"
    cancelled = admin.post(f"/api/v1/gateway/downloads/{download_id}/cancel")
    row = wait_download(admin, download_id)
    model = admin.get("/api/v1/gateway/models/tiny")
    files = model_files(gw)
    # Either registered (and completed) or gone: never a file no model points at.
    if model.status_code == 200:
        assert files == [Path(model.json()["model_path"])] and row["state"] == "completed"
    else:
        assert files == [] and row["state"] == "cancelled", (files, row)
    # The file had its name already: the download finishes, and the cancel says it came late.
    assert cancelled.status_code == 409, cancelled.text
    assert "completed" in cancelled.json()["error"]["message"]
    assert model.status_code == 200, model.text


def test_a_stop_between_rename_and_registration_finishes_the_download(
    tmp_path: Path,
    hub: FakeHub,  # noqa: F811
) -> None:
    with live_server(tmp_path / "data") as gw, gw.client(gw.admin_key) as admin:
        entered = threading.Event()
        slowed(gw.app.state.gateway.downloads, entered)  # type: ignore[union-attr]
        created = admin.post("/api/v1/gateway/downloads", json={"repo": REPO, "model_id": "t"})
        assert created.status_code == 202, created.text
        assert entered.wait(30), "the download never reached its registration"
        gw.stop()  # the control plane stops while the model is being registered
        size = len(hub.repos[REPO].files["tiny-q8.gguf"])
        gw.start()
        with gw.client(gw.admin_key) as again:
            row = wait_download(again, created.json()["id"])
            assert row["state"] == "completed", row
            model = again.get("/api/v1/gateway/models/t")
            assert model.status_code == 200, model.text
            assert model_files(gw) == [Path(model.json()["model_path"])]
        assert hub.sent == size, f"fetched {hub.sent} bytes for a file of {size}"
