"""audit.log's mode across restarts: a new file is 0600; an existing one keeps the mode its
admin gave it (group read for a log shipper), except that other users' access is removed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.secrets.conftest import LegerdThread, make_config


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def start_and_stop(state: Path, shared_dir: Path) -> None:
    """One real legerd start-up (store, audit log, sockets) and one audited call."""
    config = make_config(state, shared_dir, None, dev=True)
    with LegerdThread(config) as running, running.tcp() as client:
        assert client.post("/api/list", content=b"{}").status_code == 200


def test_a_new_audit_log_is_created_0600(tmp_path: Path, shared_dir: Path) -> None:
    previous = os.umask(0)  # a permissive umask must not widen it
    try:
        start_and_stop(tmp_path / "state", shared_dir)
    finally:
        os.umask(previous)
    assert mode(tmp_path / "state" / "audit.log") == 0o600


def test_a_restart_keeps_the_mode_the_admin_gave_the_audit_log(
    tmp_path: Path, shared_dir: Path
) -> None:
    """Before: every start-up chmod-ed audit.log back to 0600, so a 0640 set for a log
    shipper's group survived rotation but not a restart."""
    state = tmp_path / "state"
    start_and_stop(state, shared_dir)
    audit = state / "audit.log"
    audit.chmod(0o640)
    start_and_stop(state, shared_dir)
    assert mode(audit) == 0o640
    assert len(audit.read_text().splitlines()) == 2  # the same file, appended to


@pytest.mark.parametrize(("given", "kept"), [(0o644, 0o640), (0o666, 0o660), (0o604, 0o600)])
def test_start_up_removes_other_users_access_and_says_so(
    tmp_path: Path, shared_dir: Path, capsys: pytest.CaptureFixture[str], given: int, kept: int
) -> None:
    state = tmp_path / "state"
    start_and_stop(state, shared_dir)
    audit = state / "audit.log"
    audit.chmod(given)
    capsys.readouterr()
    start_and_stop(state, shared_dir)
    assert mode(audit) == kept
    out = capsys.readouterr().out
    assert "audit log was open to other users" in out
    assert f"{given:04o}" in out and f"{kept:04o}" in out


def test_a_mode_closed_to_others_is_left_alone_silently(
    tmp_path: Path, shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    start_and_stop(state, shared_dir)
    audit = state / "audit.log"
    audit.chmod(0o660)
    capsys.readouterr()
    start_and_stop(state, shared_dir)
    assert mode(audit) == 0o660
    assert "audit log was open to other users" not in capsys.readouterr().out
