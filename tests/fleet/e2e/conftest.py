"""Real control plane (uvicorn on loopback) and real ``legator-probe`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import BIN, LiveServer, live_server


class ProbeProcess:
    def __init__(self, server: LiveServer, config_dir: Path, log: Path) -> None:
        self.server = server
        self.config_dir = config_dir
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.probe_id = ""

    def init(
        self,
        token: str,
        *,
        hostname: str,
        tags: str = "",
        max_level: str = "diagnose",
        server_url: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        args = [
            str(BIN / "legator-probe"),
            "init",
            "--server",
            server_url or self.server.url,
            "--token",
            token,
            "--hostname",
            hostname,
            "--config-dir",
            str(self.config_dir),
            "--max-level",
            max_level,
        ]
        if tags:
            args += ["--tags", tags]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            self.probe_id = done.stdout.split("registered as ")[1].split(";")[0]
        return done

    def start(self, **env: str) -> ProbeProcess:
        handle = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / "legator-probe"), "run", "--config-dir", str(self.config_dir)],
            stdout=handle,
            stderr=handle,
            env={**os.environ, **env},
        )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_for(predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


UNATTENDED = "unattended"


def unattended_policy(admin: httpx.Client) -> str:
    """A remediate policy whose commands need no approval: for tests of execution itself
    (the approval path has tests of its own)."""
    for existing in admin.get("/api/v1/policies").json():
        if existing["name"] == UNATTENDED:
            return str(existing["id"])
    created = admin.post(
        "/api/v1/policies",
        json={"name": UNATTENDED, "level": "remediate", "paths": ["/"], "approval_mode": "none"},
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


@pytest.fixture
def fleet_server(tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(
        tmp_path / "data",
        fleet_offline_after_s=4,
        fleet_flush_interval_s=0.3,
        fleet_command_grace_s=3,
    ) as server:
        yield server


@pytest.fixture
def admin(fleet_server: LiveServer) -> Iterator[httpx.Client]:
    with fleet_server.client(fleet_server.admin_key) as client:
        yield client


@pytest.fixture
def spawn_probe(fleet_server: LiveServer, admin: httpx.Client, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Enrol and start a probe; returns it once the control plane sees it connected."""
    probes: list[ProbeProcess] = []

    def _spawn(
        hostname: str,
        *,
        tags: str = "",
        max_level: str = "diagnose",
        policy: str | None = None,
        start: bool = True,
        heartbeat_s: float | None = None,
    ) -> ProbeProcess:
        token = admin.post("/api/v1/tokens").json()["token"]
        probe = ProbeProcess(
            fleet_server, tmp_path / f"cfg-{hostname}", tmp_path / f"{hostname}.log"
        )
        done = probe.init(token, hostname=hostname, tags=tags, max_level=max_level)
        assert done.returncode == 0, done.stderr
        probes.append(probe)
        if heartbeat_s is not None:
            path = probe.config_dir / "probe.yaml"
            path.write_text(path.read_text() + f"heartbeat_s: {heartbeat_s}\n")
        if policy == UNATTENDED:
            policy = unattended_policy(admin)
        if policy:
            applied = admin.post(f"/api/v1/probes/{probe.probe_id}/apply-policy/{policy}")
            assert applied.status_code == 200, applied.text
        if start:
            probe.start()
            wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
            time.sleep(0.3)  # the policy pushed on connect reaches the probe
        return probe

    yield _spawn
    for probe in probes:
        probe.stop()
