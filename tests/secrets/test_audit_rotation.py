"""legerd's audit log is rotated by size (LEGERD_AUDIT_MAX_BYTES, LEGERD_AUDIT_KEEP) and
reopened on SIGHUP for an external logrotate, without losing, splitting or leaving unsynced a
single line, and each new file gets the mode of the one it replaces."""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from legator.secrets import audit as audit_module
from legator.secrets.server import ConfigProblem, Legerd
from tests.secrets.conftest import SETEC_HEADERS, LegerdThread, make_config
from tests.support import BIN, free_port

MAX_BYTES = 4096


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def rotated_files(audit: Path) -> list[Path]:
    """audit.log.N … audit.log.1, audit.log: oldest first."""
    numbered = sorted(
        (p for p in audit.parent.glob(audit.name + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    return [*numbered, audit]


def lines_of(files: list[Path]) -> list[dict[str, Any]]:
    # json.loads fails on a line split across two files or written half.
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_audit_log_rotates_by_size_without_losing_or_splitting_a_line(
    tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: audit.log grew without bound (about 40 KB here in one file). Now each file
    stays under LEGERD_AUDIT_MAX_BYTES, every line of four concurrent writers is in exactly
    one file, whole, in order per writer, and a file chmod-ed 0640 is replaced by a 0640 one."""
    monkeypatch.setenv("LEGERD_AUDIT_MAX_BYTES", str(MAX_BYTES))
    monkeypatch.setenv("LEGERD_AUDIT_KEEP", "100")
    config = make_config(tmp_path / "state", shared_dir, None, dev=True)
    with LegerdThread(config) as running:
        with running.tcp() as client:
            assert client.post("/api/put", json={"Name": "w/0", "Value": b64(b"v")}).json() == 1
        config.audit_path.chmod(0o640)

        def writer(n: int) -> None:
            with running.tcp() as client:
                for i in range(60):
                    response = client.post("/api/get", json={"Name": f"w/{n}-{i}"})
                    assert response.status_code == 404

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    files = rotated_files(config.audit_path)
    assert len(files) > 5
    assert all(f.stat().st_size <= MAX_BYTES for f in files)
    assert {mode(f) for f in files} == {0o640}
    lines = lines_of(files)
    assert len(lines) == 1 + 4 * 60
    for n in range(4):
        mine = [e["secret"] for e in lines if e["secret"].startswith(f"w/{n}-")]
        assert mine == [f"w/{n}-{i}" for i in range(60)]


def test_only_the_configured_number_of_rotated_files_is_kept(
    tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEGERD_AUDIT_MAX_BYTES", str(MAX_BYTES))
    monkeypatch.setenv("LEGERD_AUDIT_KEEP", "2")
    config = make_config(tmp_path / "state", shared_dir, None, dev=True)
    with LegerdThread(config) as running, running.tcp() as client:
        for i in range(120):
            client.post("/api/get", json={"Name": f"n/{i}"})
    audit = config.audit_path
    assert rotated_files(audit) == [Path(f"{audit}.2"), Path(f"{audit}.1"), audit]
    assert mode(audit) == 0o600
    assert lines_of(rotated_files(audit))[-1]["secret"] == "n/119"


def test_every_line_is_synced_before_its_file_is_rotated_away(
    tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads are synced by the flusher at most every 0.2 s, and the flusher syncs whatever
    file is current: each rotated file must be synced whole before it is closed."""
    synced: dict[int, int] = {}  # inode: the largest size a sync covered
    real = os.fdatasync
    calls = []

    def fdatasync(fd: int) -> None:
        real(fd)
        info = os.fstat(fd)
        synced[info.st_ino] = max(synced.get(info.st_ino, 0), info.st_size)
        calls.append(time.monotonic())

    monkeypatch.setattr(audit_module.os, "fdatasync", fdatasync)
    monkeypatch.setenv("LEGERD_AUDIT_MAX_BYTES", str(MAX_BYTES))
    monkeypatch.setenv("LEGERD_AUDIT_KEEP", "100")
    config = make_config(tmp_path / "state", shared_dir, None, dev=True)
    with LegerdThread(config) as running, running.tcp() as client:
        started = time.monotonic()
        for i in range(200):
            client.post("/api/get", json={"Name": f"r/{i}"})
        elapsed = time.monotonic() - started
        files = rotated_files(config.audit_path)[:-1]
        assert len(files) >= 5
        for f in files:
            assert synced.get(f.stat().st_ino) == f.stat().st_size, f.name
        # Batched: at most one flusher sync per 0.2 s (plus one per rotation), not per read.
        flusher_syncs = len([t for t in calls if started <= t]) - len(files)
        assert flusher_syncs <= elapsed / 0.2 + 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEGERD_AUDIT_MAX_BYTES", "-1"),
        ("LEGERD_AUDIT_MAX_BYTES", "1e6"),
        ("LEGERD_AUDIT_KEEP", "0"),
    ],
)
def test_a_bad_rotation_setting_stops_start_up(
    tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigProblem, match=name):
        Legerd(make_config(tmp_path / "state", shared_dir, None, dev=True))
    assert not (tmp_path / "state").exists()  # refused before anything is created


def test_sighup_reopens_the_audit_log_for_logrotate(tmp_path: Path, shared_dir: Path) -> None:
    """logrotate renames audit.log, then `systemctl reload legerd` (SIGHUP). Before: legerd
    went on writing into the renamed file and no audit.log came back. Now the next line goes
    to a new audit.log with the renamed file's mode, or into the one logrotate's `create` made
    (its own mode kept)."""
    state, port = tmp_path / "state", free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "legerd"),
            "serve",
            "--dev",
            "--state-dir",
            str(state),
            "--listen",
            f"127.0.0.1:{port}",
            "--socket",
            "",
        ],
        env={**os.environ, "LEGERD_KEK": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    audit = state / "audit.log"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=SETEC_HEADERS) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.post("/api/get", json={"Name": "before"})
                    break
                except httpx.TransportError:
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.05)
            audit.chmod(0o640)
            audit.rename(state / "audit.log-1")  # logrotate, `nocreate`
            proc.send_signal(signal.SIGHUP)
            _wait_until(audit.exists)
            client.post("/api/get", json={"Name": "after"})

            audit.rename(state / "audit.log-2")  # logrotate, `create 0644`
            audit.touch(mode=0o644)
            audit.chmod(0o644)
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            client.post("/api/get", json={"Name": "last"})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert [e["secret"] for e in lines_of([state / "audit.log-1"])] == ["before"]
    assert [e["secret"] for e in lines_of([state / "audit.log-2"])] == ["after"]
    assert mode(state / "audit.log-2") == 0o640
    assert [e["secret"] for e in lines_of([audit])] == ["last"]
    assert mode(audit) == 0o644


def _wait_until(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_failed_reopen_keeps_writing_to_the_current_file(
    tmp_path: Path, shared_dir: Path
) -> None:
    """A new audit.log that cannot be opened (here a directory stands in its place) must not
    stop the audit: legerd logs it and writes on in the file it had."""
    config = make_config(tmp_path / "state", shared_dir, None, dev=True)
    with LegerdThread(config) as running, running.tcp() as client:
        client.post("/api/get", json={"Name": "before"})
        renamed = config.audit_path.with_name("audit.log-1")
        config.audit_path.rename(renamed)
        config.audit_path.mkdir()
        running.legerd.reopen_audit_log()
        assert client.post("/api/get", json={"Name": "after"}).status_code == 404
    assert [e["secret"] for e in lines_of([renamed])] == ["before", "after"]
