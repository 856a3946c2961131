"""`leger backup prune`, `backup create` under the state lock, and a signal during the prune
that follows a successful apply. Real ``leger`` processes, real Podman volumes, the systemd
stand-in of ``test_deploy_review``."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

import pytest

from legator.deploy.manifest import MANIFEST_NAME, build_manifest
from legator.deploy.state import Deployments
from tests.deploy.helpers import leger
from tests.deploy.test_deploy_review import stub_systemctl
from tests.deploy.test_leger_housekeeping import state_dir, volume, write_source

__all__ = ["volume"]  # the fixture, used by name below

PYTHON = sys.executable


def versioned(tmp_path: Path, version: int) -> Path:
    """A one-container source whose manifest says ``version``, without volumes."""
    directory = tmp_path / f"m{version}"
    directory.mkdir(exist_ok=True)
    files = {
        "web.container": (
            f"[Container]\nImage=localhost/x:{version}\n[Install]\nWantedBy=default.target\n"
        ).encode()
    }
    (directory / "web.container").write_bytes(files["web.container"])
    manifest = build_manifest(
        files, version=version, created_at=datetime.now(UTC), secrets=[], services=["web"]
    )
    (directory / MANIFEST_NAME).write_text(manifest.model_dump_json())
    return directory


def install(env: dict[str, str], source: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = leger(env, "deploy", "install", "demo", "--source", str(source), *extra)
    assert done.returncode == 0, done.stderr
    return done


def listed(env: dict[str, str]) -> list[dict[str, object]]:
    result = leger(env, "backup", "list", "demo", "--json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def on_disk(env: dict[str, str]) -> list[str]:
    """Every entry of the backups folder, dot-names (temporary trees) included."""
    root = state_dir(env) / "backups"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@contextmanager
def lock_held(env: dict[str, str]) -> Iterator[None]:
    """The state lock, held by this process as a running apply would hold it."""
    state = state_dir(env)
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_backup_prune_removes_old_automatic_backups(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    """Pruning happened only during an apply: a host that stopped applying (or one that
    lowered LEGER_KEEP_BACKUPS) had no way to reclaim the space. `backup prune` applies the
    same rules: the newest N automatic backups, the newest of the recorded version and of
    the one before it, and every manual backup stay."""
    env = stub_systemctl(tmp_path, leger_env)
    keep_all = ("--keep-backups", "0")
    for version in (1, 2, 3, 1, 2):
        install(env, versioned(tmp_path, version), *keep_all)
    assert leger(env, "backup", "create", "demo").returncode == 0
    before = listed(env)
    # Newest first: manual, then the automatic ones taken before v2, v1, v3, v2, v1.
    assert [(b["automatic"], b["version"]) for b in before] == [
        (False, 2),
        (True, 1),
        (True, 3),
        (True, 2),
        (True, 1),
        (True, -1),
    ]
    doomed = [str(b["id"]) for b in before[2:3] + before[4:]]  # v3, the older v1, -1

    dry = leger(env, "backup", "prune", "demo", "--keep", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True
    assert [b["id"] for b in report["pruned"]] == doomed
    assert listed(env) == before

    # The default: LEGER_KEEP_BACKUPS, as for an apply.
    pruned = leger({**env, "LEGER_KEEP_BACKUPS": "1"}, "backup", "prune", "demo")
    assert pruned.returncode == 0, pruned.stderr
    for backup_id in doomed:
        assert backup_id in pruned.stdout
    assert "removed 3 backups" in pruned.stdout
    kept = listed(env)
    assert [b["id"] for b in kept] == [b["id"] for b in before[:2]] + [before[3]["id"]]
    assert on_disk(env) == sorted(str(b["id"]) for b in kept)

    again = leger(env, "backup", "prune", "--keep", "1", "--json")  # every deployment
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"dry_run": False, "pruned": []}
    assert leger(env, "backup", "prune", "demo", "--keep", "0").returncode == 0
    assert listed(env) == kept

    missing = leger(env, "backup", "prune", "nope")
    assert missing.returncode == 3, missing.stderr
    assert "no deployment 'nope'" in missing.stderr
    bad = leger({**env, "LEGER_KEEP_BACKUPS": "many"}, "backup", "prune", "demo")
    assert bad.returncode == 2, bad.stderr
    assert leger(env, "backup", "prune", "demo", "--keep", "-1").returncode == 2


def test_backup_prune_and_create_wait_for_the_state_lock(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    """`backup create` ran without the lock, beside an apply or a restore changing the same
    files and volumes; `backup prune` must not delete what an apply is about to keep."""
    env = {**stub_systemctl(tmp_path, leger_env), "LEGER_LOCK_TIMEOUT": "1"}
    install(env, tmp_path / "v1")
    install(env, tmp_path / "v2", "--keep-backups", "0")
    before = on_disk(env)
    with lock_held(env):
        for args in (("create", "demo"), ("prune", "demo", "--keep", "1")):
            refused = leger(env, "backup", *args)
            assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
            assert "another leger operation is still running" in refused.stderr
    assert on_disk(env) == before


def podman_shim(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """A ``podman`` on PATH that passes every command to the real one except
    ``volume export``: that one writes 1 MiB of its archive, says so in ``exporting`` (its
    pid) and then hangs, as the export of a big volume is still copying."""
    real = subprocess.run(["sh", "-c", "command -v podman"], capture_output=True, text=True)
    bin_dir = tmp_path / "podman-shim"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "podman").write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "volume export" ]; then\n'
        '  head -c 1048576 /dev/zero > "$5"\n'
        f'  echo $$ > "{tmp_path}/exporting"\n'
        "  exec sleep 120\n"
        "fi\n"
        f'exec {real.stdout.strip()} "$@"\n'
    )
    (bin_dir / "podman").chmod(0o755)
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}"}


@contextmanager
def create_caught_exporting(tmp_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """``leger backup create demo`` in a process group of its own, yielded mid-copy."""
    exporting = tmp_path / "exporting"
    exporting.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [str(Path(PYTHON).parent / "leger"), "backup", "create", "demo"],
        env={**os.environ, "NO_COLOR": "1", **podman_shim(tmp_path, env)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    try:
        deadline = time.monotonic() + 60
        while not (exporting.exists() and exporting.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the hung export, if it outlived leger


def test_an_interrupted_backup_create_leaves_nothing_half_written(
    tmp_path: Path, leger_env: dict[str, str], volume: str
) -> None:
    """SIGTERM mid-copy killed `backup create` outright: its half-written tree stayed in
    backups/ and, `create` holding no lock, a prune removed it only once an hour old. Now
    SIGTERM stops it cleanly (exit 1, nothing left), and what SIGKILL leaves is removed by
    the next `backup create` or prune, which hold the lock that every writer holds."""
    env = stub_systemctl(tmp_path, leger_env)
    install(env, write_source(tmp_path / "s1", 1, volume))
    complete = on_disk(env)
    assert len(complete) == 1

    with create_caught_exporting(tmp_path, env) as proc:
        assert len(on_disk(env)) == 2  # the temporary tree, being written
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "terminated by signal 15" in err and "Traceback" not in err, err
    assert on_disk(env) == complete

    with create_caught_exporting(tmp_path, env) as proc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    left = [name for name in on_disk(env) if name.startswith(".bk_")]
    assert len(left) == 1, on_disk(env)  # what SIGKILL leaves

    created = leger(env, "backup", "create", "demo")
    assert created.returncode == 0, created.stderr
    backup_id = created.stdout.split()[1].rstrip(":")
    assert on_disk(env) == sorted([*complete, backup_id])
    newest = listed(env)[0]
    assert newest["id"] == backup_id and newest["volumes"] == [volume]


PRUNE_PAUSED = """\
import os, sys, time
from pathlib import Path
from legator.deploy.backups import Backups

meet = Path(sys.argv[1])
delete = Backups._delete


def paused(self, backup_id):
    '''The first deletion waits for the test's signal, then goes on.'''
    if not (meet / "sent").exists():
        (meet / "pruning").write_text(str(os.getpid()))
        while not (meet / "sent").exists():
            time.sleep(0.05)
    delete(self, backup_id)


Backups._delete = paused
from legator.cli.leger import main

sys.argv = ["leger", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_the_prune_after_an_apply_still_exits_0(
    tmp_path: Path, leger_env: dict[str, str], signum: signal.Signals
) -> None:
    """The apply had succeeded and was recorded, but a SIGTERM, Ctrl-C or hang-up during the
    prune that follows it ended leger with a failure. Now the prune stops after the backup it
    is deleting, says so, and leger exits 0; the rest is pruned next time."""
    env = stub_systemctl(tmp_path, leger_env)
    for version in (1, 2, 3):
        install(env, versioned(tmp_path, version), "--keep-backups", "0")
    before = listed(env)  # taken before v3, v2, v1 (version 2, 1, -1)
    script = tmp_path / "paused.py"
    script.write_text(PRUNE_PAUSED)
    args = ["deploy", "install", "demo", "--source", str(versioned(tmp_path, 1))]
    proc = subprocess.Popen(
        [PYTHON, str(script), str(tmp_path), *args, "--keep-backups", "1"],
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pruning = tmp_path / "pruning"
        deadline = time.monotonic() + 60
        while not (pruning.exists() and pruning.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signum)
        (tmp_path / "sent").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, (out, err)
    assert f"by signal {int(signum)} while pruning old backups" in out, out
    record = Deployments(state_dir(env) / "deployments.json").get("demo")
    assert record is not None and record.version == 1 and record.source.endswith("m1")
    # Kept: the new one (before v1, holding 3) and the newest holding 1; of the two doomed
    # (holding 2 and -1) only the first was deleted.
    after = listed(env)
    assert [b["version"] for b in after] == [3, 1, -1]
    assert before[0]["id"] not in [b["id"] for b in after]
    assert not [name for name in on_disk(env) if name.startswith(".")]
    pruned = leger(env, "backup", "prune", "demo", "--keep", "1", "--json")
    assert [b["version"] for b in json.loads(pruned.stdout)["pruned"]] == [-1]
