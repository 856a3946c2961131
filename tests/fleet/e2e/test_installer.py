"""``/install.sh`` into a temporary root, systemctl stubbed at the edge (a recording script on
PATH); then the installed zipapp runs as a real probe and updates itself."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from legator import __version__
from tests.fleet.e2e.conftest import wait_for
from tests.support import LiveServer


@pytest.fixture
def stub_path(tmp_path: Path) -> tuple[str, Path]:
    bin_dir = tmp_path / "stubbin"
    bin_dir.mkdir()
    record = tmp_path / "systemctl.calls"
    stub = bin_dir / "systemctl"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {record}\n')
    stub.chmod(0o755)
    return f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", record


def _install(
    server: LiveServer, root: Path, path: str, *args: str
) -> subprocess.CompletedProcess[str]:
    script = httpx.get(server.url + "/install.sh").text
    return subprocess.run(
        ["sh", "-s", "--", *args],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PATH": path,
            "LEGATOR_ROOT": str(root),
            "LEGATOR_PYTHON": sys.executable,
        },
    )


def test_install_sh_validates_its_arguments(
    fleet_server: LiveServer, tmp_path: Path, stub_path
) -> None:  # type: ignore[no-untyped-def]
    path, _ = stub_path
    done = _install(fleet_server, tmp_path / "root", path, "--token", "x")
    assert done.returncode == 1 and "--server is required" in done.stderr
    done = _install(
        fleet_server,
        tmp_path / "root",
        path,
        "--server",
        fleet_server.url,
        "--token",
        "x",
        "--arch",
        "sparc",
    )
    assert done.returncode == 1 and "unsupported architecture" in done.stderr
    done = _install(
        fleet_server, tmp_path / "root", path, "--server", fleet_server.url, "--token", "prb_wrong"
    )
    assert done.returncode != 0 and "registration refused (401)" in done.stderr


def test_install_run_and_self_update(
    fleet_server: LiveServer, admin: httpx.Client, tmp_path: Path, stub_path
) -> None:  # type: ignore[no-untyped-def]
    path, record = stub_path
    root = tmp_path / "root"
    token = admin.post("/api/v1/tokens").json()["token"]
    done = _install(
        fleet_server,
        root,
        path,
        "--server",
        fleet_server.url,
        "--token",
        token,
        "--tags",
        "edge,lab",
        "--allow-updates",  # its local maximum is diagnose
        "--no-start",
    )
    assert done.returncode == 0, done.stderr
    assert "not started" in done.stdout
    assert record.read_text().splitlines() == ["daemon-reload", "enable legator-probe.service"]
    pyz = root / "opt/legator/legator-probe.pyz"
    config = root / "etc/legator/probe.yaml"
    unit = (root / "etc/systemd/system/legator-probe.service").read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "ExecStart=/usr/bin/env python3 /opt/legator/legator-probe.pyz run" in unit
    for hardening in ("NoNewPrivileges=yes", "ProtectKernelModules=yes", "PrivateTmp=yes"):
        assert hardening in unit
    served = httpx.get(f"{fleet_server.url}/download/legator-probe-{__version__}.pyz")
    assert pyz.read_bytes() == served.content
    assert served.headers["x-checksum-sha256"] == hashlib.sha256(served.content).hexdigest()
    assert httpx.get(f"{fleet_server.url}/download/legator-probe-9.9.9.pyz").status_code == 404

    # the installed zipapp is a working probe
    log = (tmp_path / "pyz.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, str(pyz), "run", "--config", str(config)], stdout=log, stderr=log
    )
    try:
        probe = wait_for(
            lambda: [
                p
                for p in admin.get("/api/v1/probes").json()
                if p["connected"] and p["tags"] == ["edge", "lab"]
            ]
        )[0]
        ran = admin.post(
            f"/api/v1/probes/{probe['id']}/command?wait=true", json={"command": "uname"}
        ).json()
        assert ran["status"] == "completed" and ran["stdout"] == "Linux\n"
        # self-update: a new build (same code, one byte different) swapped in atomically
        new = served.content + b"\n"
        (tmp_path / "www").mkdir()
        update_file = tmp_path / "www" / "new.pyz"
        update_file.write_bytes(new)
        http = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0"],
            cwd=tmp_path / "www",
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = _http_port(http)
            answer = admin.post(
                f"/api/v1/probes/{probe['id']}/update",
                json={
                    "url": f"http://127.0.0.1:{port}/new.pyz",
                    "version": "0.1.1",
                    "sha256": hashlib.sha256(new).hexdigest(),
                },
            )
            assert answer.status_code == 200, answer.text
            assert pyz.read_bytes() == new
            wait_for(
                lambda: admin.get(f"/api/v1/probes/{probe['id']}").json()["connected"], timeout=20
            )
            assert proc.poll() is None  # re-exec'd in place, same pid
        finally:
            http.terminate()
            http.wait()
    finally:
        proc.terminate()
        proc.wait(10)


def _http_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)"
    return int(line.split(" port ")[1].split()[0])


def test_install_starts_the_service(
    fleet_server: LiveServer, admin: httpx.Client, tmp_path: Path, stub_path
) -> None:  # type: ignore[no-untyped-def]
    path, record = stub_path
    token = admin.post("/api/v1/tokens").json()["token"]
    done = _install(
        fleet_server,
        tmp_path / "root",
        path,
        "--server",
        fleet_server.url,
        "--token",
        token,
        "--config-dir",
        "/etc/legator-alt",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "root/etc/legator-alt/probe.yaml").exists()
    assert record.read_text().splitlines()[-1] == "restart legator-probe.service"
