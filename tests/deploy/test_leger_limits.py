"""What leger downloads from a control plane is capped while it arrives: a hostile or broken
server that sends far more than it should gets one error line naming the path and the limit,
leger's memory stays small and nothing is left on disk. The control plane is a stand-in
(``hostile_plane``) because the real one never misbehaves so; the real one's downloads are
covered by ``test_full_cycle``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from legator.core import bounded_http
from legator.deploy.client import ControlPlane, ControlPlaneError, Login, login_with_device
from tests.deploy.hostile_plane import Plan, hostile_plane
from tests.deploy.test_leger_errors import log_in
from tests.support import one_line_error

LEGER = str(Path(sys.executable).parent / "leger")
FLOOD = 256 * 1024 * 1024
# A leger run that reads no more than its limits peaks near 110 MiB here; one that holds the
# flood needs at least FLOOD.
MAX_RSS = 160 * 1024 * 1024
# What the stand-in can write before leger hangs up: the limit plus the socket buffers.
MAX_SENT = 32 * 1024 * 1024
RENDERED = "/api/v1/deploy/rendered/latest"


@dataclass
class Run:
    result: subprocess.CompletedProcess[str]
    peak_rss: int


def run_measured(env: dict[str, str], *args: str) -> Run:
    """``leger ARGS`` with the peak resident memory of that one process, by GNU time (a
    ``wait4`` here would count this test process too: its child starts as a copy of it)."""
    report = Path(env["HOME"]) / "peak-rss"
    report.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["/usr/bin/time", "-o", str(report), "-f", "%M", LEGER, *args],
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    peak_kib = int(report.read_text().split()[-1])
    return Run(result, peak_kib * 1024)


def left_on_disk(env: dict[str, str]) -> list[str]:
    """Files under leger's state and quadlet directories (the lock file aside)."""
    found = []
    for key in ("LEGER_STATE_DIR", "LEGER_QUADLET_DIR"):
        root = Path(env[key])
        if root.exists():
            found += [str(p) for p in root.rglob("*") if p.is_file() and p.name != ".lock"]
    return found


INSTALL = ("deploy", "install", "app", "--no-start")


@pytest.mark.parametrize(
    ("plan", "args", "message"),
    [
        # The manifest says 32 bytes; the file's answer does not stop there.
        (
            Plan(FLOOD, f"{RENDERED}/app.container"),
            INSTALL,
            f"GET {RENDERED}/app.container: the answer is over the 32 bytes accepted",
        ),
        # The manifest itself never ends.
        (
            Plan(FLOOD, f"{RENDERED}/manifest.json"),
            INSTALL,
            f"GET {RENDERED}/manifest.json: the answer is over the 1 MiB accepted",
        ),
        # A configuration that never ends, written to config.json by `config pull`.
        (
            Plan(FLOOD, "/api/v1/deploy/configs/latest"),
            ("config", "pull"),
            "GET /api/v1/deploy/configs/latest: the answer is over the 4 MiB accepted",
        ),
        # An error page that never ends: only its start is read, for the message.
        (
            Plan(FLOOD, "/api/v1/deploy/configs/latest", status=500),
            ("config", "pull"),
            "GET /api/v1/deploy/configs/latest: 500 ",
        ),
    ],
    ids=["file", "manifest", "config", "error"],
)
def test_a_flood_is_refused_while_it_arrives(
    env: dict[str, str], plan: Plan, args: tuple[str, ...], message: str
) -> None:
    with hostile_plane(plan) as url:
        log_in(env, url)
        run = run_measured(env, *args)
    line = one_line_error(run.result, 1)
    assert message in line
    assert len(line) < 500
    assert plan.sent < MAX_SENT, f"leger read {plan.sent} bytes of the flood"
    assert run.peak_rss < MAX_RSS, f"leger peaked at {run.peak_rss >> 20} MiB"
    assert left_on_disk(env) == []


def test_a_manifest_listing_a_huge_file_downloads_no_file(env: dict[str, str]) -> None:
    """Refused from the manifest alone, before any file is asked for."""
    plan = Plan(FLOOD, f"{RENDERED}/app.container", declared=5 * 1024**3)
    with hostile_plane(plan) as url:
        log_in(env, url)
        run = run_measured(env, *INSTALL)
    line = one_line_error(run.result, 1)
    assert f"{RENDERED}/manifest.json: app.container is 5368709120 bytes" in line
    assert "over the 1 MiB leger accepts for a file" in line
    assert plan.paths == [f"{RENDERED}/manifest.json"] and plan.sent == 0
    assert left_on_disk(env) == []


def test_a_dripping_answer_is_given_up_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte every 0.2 s never trips the 30 s wait for the next bytes: a server could hold
    leger (and a timer's `leger deploy update`) forever. Each request now has a deadline in
    all (``REQUEST_DEADLINE``, 300 s; 2 s here)."""
    monkeypatch.setattr(bounded_http, "REQUEST_DEADLINE", 2.0)
    plan = Plan(100, "/api/v1/deploy/configs/latest", drip=0.2)  # 20 s in all
    with hostile_plane(plan) as url:
        login = Login(url, "lgk_" + "0" * 64, "api_key", "admin", None, None, "2026-01-01")
        started = time.monotonic()
        with pytest.raises(ControlPlaneError) as caught, ControlPlane(login) as api:
            api.get_json("/api/v1/deploy/configs/latest")
        took = time.monotonic() - started
    assert str(caught.value).startswith("GET /api/v1/deploy/configs/latest: ")
    assert "no complete answer within 2 s" in str(caught.value)
    assert took < 15, f"gave up after {took:.1f} s"  # all 100 bytes take 20 s


class Stop(Exception):
    pass


def test_a_device_grant_cannot_ask_for_endless_polling() -> None:
    """The control plane's grant set how often and how long leger polls: ``interval`` 0 made
    it poll without pause, ``expires_in`` of 30 years made it wait that long. Now leger waits
    1 to 60 s between polls and at most 15 minutes in all."""
    shown: list[int] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            raise Stop

    with hostile_plane(Plan(0, "/none")) as url, pytest.raises(Stop):
        login_with_device(url, "host", lambda _code, ttl: shown.append(ttl), sleep=sleep)
    assert shown == [15 * 60]
    assert waits == [1, 1, 1]


@pytest.mark.parametrize("manifest", [False, True], ids=["quadlets", "manifest"])
def test_a_huge_file_in_a_directory_source_is_refused_unread(
    env: dict[str, str], tmp_path: Path, manifest: bool
) -> None:
    """A directory or git source (a repository someone else controls) is held to the same
    limits: its files were read whole first. The huge file is sparse: it costs no disk."""
    source = tmp_path / "src"
    source.mkdir()
    huge = source / ("app.container" if manifest else "huge.container")
    with huge.open("wb") as sparse:
        sparse.truncate(512 * 1024 * 1024)
    if manifest:
        listed = {"path": huge.name, "sha256": "0" * 64, "size": huge.stat().st_size}
        body = {"version": 1, "created_at": "2026-01-01T00:00:00Z", "files": [listed]}
        (source / "manifest.json").write_text(json.dumps(body))
    run = run_measured(env, *INSTALL, "--dry-run", "--source", str(source))
    line = one_line_error(run.result, 1)
    assert f"{huge.name} is 536870912 bytes, over the 1 MiB leger accepts for a file" in line
    assert run.peak_rss < MAX_RSS, f"leger peaked at {run.peak_rss >> 20} MiB"


def test_config_pull_keeps_only_a_configuration(env: dict[str, str]) -> None:
    """Any other JSON (here `{"pad": "…"}`) is refused and config.json is not written; a
    version that is not a number never reaches the server (it would name another path)."""
    plan = Plan(10, "/api/v1/deploy/configs/latest")
    with hostile_plane(plan) as url:
        log_in(env, url)
        pulled = run_measured(env, "config", "pull").result
        traversal = run_measured(env, "config", "pull", "--version", "../../keys").result
    line = one_line_error(pulled, 1)
    assert "not a configuration (version: Field required)" in line, line
    assert "--version '../../keys': expected a version number" in one_line_error(traversal, 2)
    assert plan.paths.count("/api/v1/deploy/configs/latest") == 1
    assert left_on_disk(env) == []
