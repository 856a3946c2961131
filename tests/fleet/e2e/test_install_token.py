"""The enrolment token never shows in a process's arguments during ``/install.sh``: every
command the installer starts is a recorder on PATH (and the interpreter, LEGATOR_PYTHON, one
too) that logs its argv before running the real thing, and /proc/*/cmdline is watched while
the install runs. A multi-use, non-expiring token read from ``ps`` enrols rogue probes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import LiveServer

# The external commands install.sh runs with a root of its own (LEGATOR_ROOT); `id` and
# `useradd` only without one.
COMMANDS = ("uname", "mkdir", "chmod", "dirname", "mv", "cat", "sed", "tr", "stty", "id")


class Recorder:
    def __init__(self, tmp_path: Path) -> None:
        self.bin = tmp_path / "recbin"
        self.bin.mkdir()
        self.log = tmp_path / "argv.log"
        self.log.touch()
        for name in COMMANDS:
            real = shutil.which(name)
            assert real is not None, name
            self._wrap(self.bin / name, real)
        self._wrap(self.bin / "python", sys.executable)
        # systemctl: recorded, not run
        self._wrap(self.bin / "systemctl", "true")

    def _wrap(self, path: Path, real: str) -> None:
        # One line per exec: whether LEGATOR_TOKEN is in its environment, then its argv.
        path.write_text(
            "#!/bin/sh\n"
            f'printf \'%s %s\\n\' "${{LEGATOR_TOKEN:+ENV}}" "$0 $*" >> {self.log}\n'
            f'exec {real} "$@"\n'
        )
        path.chmod(0o755)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()


class CmdlineWatch:
    """Reads every process's /proc/PID/cmdline until stopped; keeps those holding ``needle``."""

    def __init__(self, needle: str) -> None:
        self.needle = needle.encode()
        self.seen: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        own = str(os.getpid())
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == own:
                    continue
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if self.needle in cmdline:
                    self.seen.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
            self.scans += 1

    def __enter__(self) -> CmdlineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    return Recorder(tmp_path)


@pytest.fixture
def token(admin: httpx.Client) -> Iterator[str]:
    yield admin.post("/api/v1/tokens", params={"multi_use": "true"}).json()["token"]


def _install(
    server: LiveServer,
    recorder: Recorder,
    root: Path,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    script = httpx.get(server.url + "/install.sh").text
    base = {k: v for k, v in os.environ.items() if k != "LEGATOR_TOKEN"}
    return subprocess.run(
        ["sh", "-s", "--", "--server", server.url, "--no-start", *args],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        # No controlling terminal: the installer's prompt for a missing token cannot wait.
        start_new_session=True,
        env={
            **base,
            "PATH": f"{recorder.bin}:{base['PATH']}",
            "LEGATOR_ROOT": str(root),
            "LEGATOR_PYTHON": str(recorder.bin / "python"),
            **(env or {}),
        },
    )


def _enrolled_and_forgotten(admin: httpx.Client, root: Path) -> None:
    """The probe registered (the token reached init); delete it so that the next install,
    from the same hostname, may enrol again."""
    config = root / "etc/legator/probe.yaml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    probe_id = next(
        line.split(":", 1)[1].strip().strip("'\"")
        for line in config.read_text().splitlines()
        if line.startswith("probe_id:")
    )
    assert admin.get(f"/api/v1/probes/{probe_id}").status_code == 200
    assert admin.delete(f"/api/v1/probes/{probe_id}").status_code in (200, 204)


def test_the_token_reaches_init_through_the_environment_only(
    fleet_server: LiveServer, admin: httpx.Client, recorder: Recorder, token: str, tmp_path: Path
) -> None:
    # The printed one-liner: the token in the environment, none in any argument.
    created = admin.post("/api/v1/tokens").json()
    command = created["install_command"]
    assert command.startswith(f"export LEGATOR_TOKEN={created['token']}; curl -fsSL ")
    assert "sudo --preserve-env=LEGATOR_TOKEN sh -s -- --server " in command
    assert created["token"] not in command.split(";", 1)[1]

    with CmdlineWatch(token) as watch:
        done = _install(fleet_server, recorder, tmp_path / "root", env={"LEGATOR_TOKEN": token})
    assert done.returncode == 0, done.stderr
    _enrolled_and_forgotten(admin, tmp_path / "root")
    lines = recorder.lines()
    assert any(" init --server " in line for line in lines)
    assert not [line for line in lines if token in line]
    assert watch.scans > 0 and watch.seen == []
    # Only legator-probe init has the token, in its environment; no other command inherits it.
    with_token = [line for line in lines if line.startswith("ENV ")]
    assert len(with_token) == 1 and " init --server " in with_token[0], lines


def test_the_token_from_a_file(
    fleet_server: LiveServer, admin: httpx.Client, recorder: Recorder, token: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\r\n")
    token_file.chmod(0o600)
    with CmdlineWatch(token) as watch:
        done = _install(
            fleet_server, recorder, tmp_path / "a", "--token-file", str(token_file), "--tags", "x"
        )
    assert done.returncode == 0, done.stderr
    _enrolled_and_forgotten(admin, tmp_path / "a")
    assert not [line for line in recorder.lines() if token in line]
    assert watch.seen == []


def test_the_compatible_token_flag_reaches_no_command_line_past_the_installer(
    fleet_server: LiveServer, admin: httpx.Client, recorder: Recorder, token: str, tmp_path: Path
) -> None:
    # --token still works; it shows in the installer's own arguments (documented), but in no
    # command the installer starts.
    with CmdlineWatch(token) as watch:
        done = _install(fleet_server, recorder, tmp_path / "b", "--token", token)
    assert done.returncode == 0, done.stderr
    _enrolled_and_forgotten(admin, tmp_path / "b")
    assert not [line for line in recorder.lines() if token in line]
    assert watch.seen and all(seen.startswith("sh -s -- ") for seen in watch.seen), watch.seen


def test_no_token_is_refused(fleet_server: LiveServer, recorder: Recorder, tmp_path: Path) -> None:
    done = _install(fleet_server, recorder, tmp_path / "root")
    assert done.returncode == 1
    assert "enrolment token is required" in done.stderr and "LEGATOR_TOKEN" in done.stderr
    missing = _install(fleet_server, recorder, tmp_path / "root", "--token-file", "/nonexistent")
    assert missing.returncode == 1 and "--token-file" in missing.stderr
    assert not (tmp_path / "root/opt/legator").exists()
