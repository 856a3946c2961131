"""Housekeeping of leger's state directory: automatic backups pruned after an apply, temporary
trees left by a killed stage or install cleared, and SIGHUP (terminal lost) during an apply
rolling back as SIGTERM does. Real ``leger`` processes, real Podman volumes."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import secrets
import signal
import subprocess
import tarfile
import termios
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from legator.deploy.manifest import MANIFEST_NAME, build_manifest
from legator.deploy.state import Deployments
from tests.deploy.helpers import leger, podman
from tests.deploy.test_deploy_review import LEGER, hung_in_start, stub_systemctl


def write_source(directory: Path, version: int, volume: str) -> Path:
    """A one-container source with a named volume and a manifest saying ``version``."""
    files = {
        "web.container": (
            f"[Container]\nImage=localhost/x:{version}\nVolume=data.volume:/data\n"
            "[Install]\nWantedBy=default.target\n"
        ).encode(),
        "data.volume": f"[Volume]\nVolumeName={volume}\n".encode(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    manifest = build_manifest(
        files, version=version, created_at=datetime.now(UTC), secrets=[], services=["web"]
    )
    (directory / MANIFEST_NAME).write_text(manifest.model_dump_json())
    return directory


@pytest.fixture
def volume(tmp_path: Path, containers_conf: Path) -> Iterator[str]:
    """A Podman volume holding 256 KiB, so that each backup exports something."""
    name = f"leger-hk-{secrets.token_hex(4)}"
    assert podman("volume", "create", name).returncode == 0
    archive = tmp_path / "volume.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("blob")
        info.size = 256 * 1024
        tar.addfile(info, io.BytesIO(os.urandom(info.size)))
    imported = podman("volume", "import", name, str(archive))
    assert imported.returncode == 0, imported.stderr
    yield name
    podman("volume", "rm", "--force", name)


def state_dir(env: dict[str, str]) -> Path:
    return Path(env["XDG_DATA_HOME"]) / "leger"


def backups(env: dict[str, str]) -> list[dict[str, object]]:
    listed = leger(env, "backup", "list", "demo", "--json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


def disk_use(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_automatic_backups_are_pruned_to_the_newest_n(
    tmp_path: Path, leger_env: dict[str, str], volume: str
) -> None:
    """Every apply exported the volumes into a new automatic backup and none was ever
    deleted: the backups folder grew by the size of the volumes on each update. Now only the
    newest N automatic backups of the deployment stay (LEGER_KEEP_BACKUPS, --keep-backups);
    manual ones are never pruned."""
    env = {**stub_systemctl(tmp_path, leger_env), "LEGER_KEEP_BACKUPS": "2"}
    one, two = (write_source(tmp_path / f"s{v}", v, volume) for v in (1, 2))
    assert leger(env, "deploy", "install", "demo", "--source", str(one)).returncode == 0
    manual = leger(env, "backup", "create", "demo")
    assert manual.returncode == 0, manual.stderr
    for source in (two, one, two, one):
        done = leger(env, "deploy", "install", "demo", "--source", str(source))
        assert done.returncode == 0, done.stderr
    kept = backups(env)
    automatic = [b for b in kept if b["automatic"]]
    assert [b["version"] for b in automatic] == [2, 1]  # the newest two: before v1, before v2
    assert [b["volumes"] for b in automatic] == [[volume], [volume]]
    assert [b["reason"] for b in kept if not b["automatic"]] == ["manual"]
    on_disk = sorted(p.name for p in (state_dir(env) / "backups").iterdir())
    assert on_disk == sorted(str(b["id"]) for b in kept)
    # The flag overrides the variable; 0 keeps every automatic backup.
    for source in (two, one, two):
        done = leger(
            env, "deploy", "install", "demo", "--source", str(source), "--keep-backups", "0"
        )
        assert done.returncode == 0, done.stderr
    assert len([b for b in backups(env) if b["automatic"]]) == 5
    done = leger(env, "deploy", "install", "demo", "--source", str(one), "--keep-backups", "1")
    assert done.returncode == 0, done.stderr
    assert [b["version"] for b in backups(env) if b["automatic"]] == [2, 1]
    bad = leger({**env, "LEGER_KEEP_BACKUPS": "many"}, "deploy", "install", "demo")
    assert bad.returncode == 2 and "LEGER_KEEP_BACKUPS" in bad.stderr, bad.stderr


def test_pruning_keeps_the_only_way_back_to_the_recorded_version(
    tmp_path: Path, leger_env: dict[str, str], volume: str
) -> None:
    """With one backup to keep, v1 -> v2 -> v1 keeps the backup taken before the last apply
    (the previous version, 2) and also the newest one holding version 1, the recorded one:
    it is the only copy of that version's files and volumes. A staged apply prunes too."""
    env = stub_systemctl(tmp_path, leger_env)
    one, two = (write_source(tmp_path / f"s{v}", v, volume) for v in (1, 2))
    keep_one = ("--keep-backups", "1")
    for source in (one, two):
        done = leger(env, "deploy", "install", "demo", "--source", str(source), *keep_one)
        assert done.returncode == 0, done.stderr
    assert leger(env, "staged", "stage", "demo", "--source", str(one)).returncode == 0
    applied = leger(env, "staged", "apply", "demo", *keep_one)
    assert applied.returncode == 0, applied.stderr
    record = Deployments(state_dir(env) / "deployments.json").get("demo")
    assert record is not None and record.version == 1
    assert [b["version"] for b in backups(env)] == [2, 1]  # the one before v1 (-1) is gone


def test_temporary_trees_of_killed_stages_are_cleared_at_the_next_stage(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    """A `staged stage` or `deploy install` killed while it wrote its temporary tree left
    `staged/.NAME.*` or `.incoming/.NAME.*` behind (mkdtemp names, never reused) and nothing
    removed them. The next stage, holding the state lock that every writer of those folders
    holds, removes them; a staged tree caught between the two renames of its swap (only in
    `.NAME.old`) is put back rather than deleted."""
    env = stub_systemctl(tmp_path, leger_env)
    state = state_dir(env)
    assert leger(env, "staged", "stage", "demo", "--source", str(tmp_path / "v1")).returncode == 0
    # What SIGKILL leaves: half-written trees under mkdtemp's names, old and recent.
    leftovers = [
        state / "staged" / ".demo.k1ll3d_a",
        state / "staged" / ".other.k1ll3d_b",
        state / ".incoming" / ".demo.k1ll3d_c",
        state / ".incoming" / "demo",
    ]
    for path in leftovers:
        path.mkdir(parents=True)
        (path / "web.container").write_bytes(b"[Container]\nImage=half")
    hour_ago = time.time() - 3600
    os.utime(leftovers[0], (hour_ago, hour_ago))
    # `other` was mid-swap: its only complete tree is `.other.old`.
    assert leger(env, "staged", "stage", "other", "--source", str(tmp_path / "v3")).returncode == 0
    (state / "staged" / "other").rename(state / "staged" / ".other.old")

    staged = leger(env, "staged", "stage", "demo", "--source", str(tmp_path / "v2"))
    assert staged.returncode == 0, staged.stderr
    assert sorted(p.name for p in (state / "staged").iterdir()) == ["demo", "other"]
    assert "Image=localhost/x:3" in (state / "staged/other/web.container").read_text()
    assert list((state / ".incoming").glob("*")) == []
    listed = leger(env, "staged", "list", "--json")
    assert [row["name"] for row in json.loads(listed.stdout)] == ["demo", "other"]


def test_sighup_during_an_apply_rolls_back(tmp_path: Path, leger_env: dict[str, str]) -> None:
    """The terminal is lost (an ssh session drops): the kernel sends SIGHUP to the
    foreground process group. leger died at once, without a rollback, with v2's files
    installed under v1's record. Now SIGHUP interrupts like SIGTERM: the apply rolls back
    and exits 5; a second SIGHUP during the rollback does not cut it short."""
    env = stub_systemctl(tmp_path, leger_env)
    first = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v1"))
    assert first.returncode == 0, first.stderr
    stopping = tmp_path / "in-stop"
    with hung_in_start(
        tmp_path, env, "deploy", "install", "demo", "--source", str(tmp_path / "v2"), own_group=True
    ) as proc:
        (tmp_path / "slow-stop").touch()  # the rollback's first step takes 3 s
        os.killpg(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not (stopping.exists() and stopping.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGHUP)
        _out, err = proc.communicate(timeout=60)
    quadlets = Path(env["LEGER_QUADLET_DIR"])
    assert "Image=localhost/x:1" in (quadlets / "web.container").read_text(), err
    assert proc.returncode == 5, err
    assert "hung up by signal 1; rolled back" in err
    record = Deployments(state_dir(env) / "deployments.json").get("demo")
    assert record is not None and record.source.endswith("v1")
    starts = (tmp_path / "starts").read_text().splitlines()
    assert starts == ["--user start web.service"] * 3  # v1, v2 (hung), v1 again
    assert not list(state_dir(env).glob(".applying-*"))


def test_a_lost_terminal_rolls_back(tmp_path: Path, leger_env: dict[str, str]) -> None:
    """The real thing: leger in a session of its own with a pseudo-terminal as controlling
    terminal and as its output; the terminal's other end is closed mid-apply, so the kernel
    sends SIGHUP and every later write to the terminal fails. The apply still rolls back."""
    env = stub_systemctl(tmp_path, leger_env)
    first = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v1"))
    assert first.returncode == 0, first.stderr
    (tmp_path / "hang").touch()
    hanging = tmp_path / "hanging"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [LEGER, "deploy", "install", "demo", "--source", str(tmp_path / "v2")],
        env={**os.environ, **env},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    drained = threading.Thread(target=drain, args=(master,), daemon=True)
    drained.start()
    try:
        deadline = time.monotonic() + 60
        while not (hanging.exists() and hanging.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.close(master)
    rc = proc.wait(timeout=60)
    quadlets = Path(env["LEGER_QUADLET_DIR"])
    assert "Image=localhost/x:1" in (quadlets / "web.container").read_text()
    record = Deployments(state_dir(env) / "deployments.json").get("demo")
    assert record is not None and record.source.endswith("v1")
    assert not list(state_dir(env).glob(".applying-*"))
    assert rc == 5


def drain(fd: int) -> None:
    """Read a terminal's output until it is closed, so that the writer never blocks."""
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass
