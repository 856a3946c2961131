"""The offline admin commands work on the database that was meant or not at all (no silent
in-memory or new, empty database), say what is wrong with a value, and write backups that
no other user can read at any moment."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from legator.cli import offline
from legator.core.config import ConfigError, load_settings
from legator.core.errors import BadRequest
from tests.support import BIN, run_cli

UNSET = {"LEGATOR_DATA_DIR": "", "LEGATOR_DATABASE_URL": ""}


def _legator(*args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli("legator", *args, env={**UNSET, **env}, input=input)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("offline") / "data"
    done = _legator(
        "users", "create", "ops", "--password-stdin", "--data-dir", str(path), input="p" * 16
    )
    assert done.returncode == 0, done.stderr
    return path


def test_db_commands_refuse_an_in_memory_database() -> None:
    for command in (("db", "upgrade"), ("db", "current")):
        unset = _legator(*command)
        assert unset.returncode == 2, unset
        assert "LEGATOR_DATA_DIR" in unset.stderr and "revision" not in unset.stdout
        memory = _legator(*command, LEGATOR_DATABASE_URL="sqlite://")
        assert memory.returncode == 2, memory
        assert "in-memory" in memory.stderr and "revision" not in memory.stdout


def test_a_data_dir_that_does_not_exist_is_refused_and_not_created(tmp_path: Path) -> None:
    typo = tmp_path / "typo"
    for command in (
        ("users", "list"),
        ("users", "disable", "ops"),
        ("keys", "list"),
        ("keys", "create", "--user", "ops"),
        ("db", "current"),
        ("backup", str(tmp_path / "copy.db")),
    ):
        done = _legator(*command, "--data-dir", str(typo))
        assert done.returncode == 2, (command, done)
        assert f"{typo} does not exist" in " ".join(done.stderr.split()), (command, done.stderr)
        assert "Traceback" not in done.stderr
        assert not typo.exists(), command
    set_password = _legator(
        "users",
        "set-password",
        "ops",
        "--password-stdin",
        input="q" * 16,
        LEGATOR_DATA_DIR=str(typo),
    )
    assert set_password.returncode == 2 and not typo.exists()
    assert not (tmp_path / "copy.db").exists()


def test_a_data_dir_without_a_database_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    listing = _legator("users", "list", "--data-dir", str(empty))
    assert listing.returncode == 2 and "no Legator database" in listing.stderr
    url = _legator("keys", "list", LEGATOR_DATABASE_URL=f"sqlite:///{tmp_path}/other.db")
    assert url.returncode == 2 and "no Legator database" in url.stderr
    assert list(empty.iterdir()) == [] and not (tmp_path / "other.db").exists()


def test_first_time_setup_creates_the_data_dir_and_says_so(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    upgraded = _legator("db", "upgrade", "--data-dir", str(fresh))
    assert upgraded.returncode == 0, upgraded.stderr
    assert "creating a new one" in upgraded.stderr and (fresh / "legator.db").is_file()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    current = _legator("db", "current", "--data-dir", str(fresh))
    assert current.returncode == 0 and "(empty)" not in current.stdout

    other = tmp_path / "other"
    created = _legator("users", "create", "first", "--role", "admin", "--data-dir", str(other))
    assert created.returncode == 0, created.stderr
    assert "creating a new one" in created.stderr and "password (shown once)" in created.stdout
    listing = _legator("users", "list", "--json", "--data-dir", str(other))
    assert listing.returncode == 0 and '"first"' in listing.stdout
    again = _legator("users", "create", "second", "--data-dir", str(other))
    assert again.returncode == 0 and "creating" not in again.stderr


def test_users_create_says_what_is_wrong(data_dir: Path) -> None:
    short = _legator(
        "users", "create", "amy", "--password-stdin", "--data-dir", str(data_dir), input="short\n"
    )
    assert short.returncode == 2
    assert "password: must be at least 12 characters" in short.stderr
    bad_name = _legator("users", "create", "no spaces!", "--data-dir", str(data_dir))
    assert bad_name.returncode == 2 and "username: must be 1-64 characters" in bad_name.stderr
    set_password = _legator(
        "users", "set-password", "ops", "--password-stdin", "--data-dir", str(data_dir), input="x"
    )
    assert set_password.returncode == 2
    assert "password: must be at least 12 characters" in set_password.stderr


def test_an_empty_password_on_stdin_is_refused_not_generated(tmp_path: Path) -> None:
    target = tmp_path / "data"
    for given in ("", "\n"):
        done = _legator(
            "users", "create", "amy", "--password-stdin", "--data-dir", str(target), input=given
        )
        assert done.returncode == 2, done
        assert "--password-stdin" in done.stderr and "password" not in done.stdout
        assert not target.exists()  # nothing created either


# ----- backups ----------------------------------------------------------------------------


def _big_database(data_dir: Path, megabytes: int) -> None:
    db = sqlite3.connect(data_dir / "legator.db")
    with db:
        db.execute("CREATE TABLE IF NOT EXISTS ballast (data BLOB)")
        db.executemany(
            "INSERT INTO ballast VALUES (?)", ((os.urandom(1 << 20),) for _ in range(megabytes))
        )
    db.close()


def test_the_backup_is_never_readable_by_others_while_it_is_written(data_dir: Path) -> None:
    """Watch the copy's mode from outside while `legator backup` writes 64 MiB into it."""
    _big_database(data_dir, 64)
    target = data_dir.parent / "watched.db"
    proc = subprocess.Popen(
        ["sh", "-c", 'umask 022; exec "$0" "$@"', str(BIN / "legator"), "backup", str(target)],
        env={**os.environ, **UNSET, "LEGATOR_DATA_DIR": str(data_dir), "NO_COLOR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    modes: set[int] = set()
    observations = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            modes.add(stat.S_IMODE(os.stat(target).st_mode))
            observations += 1
        except FileNotFoundError:
            pass
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert observations > 0  # it was seen while being written
    assert modes == {0o600}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    copy = sqlite3.connect(target)
    assert copy.execute("SELECT count(*) FROM ballast").fetchone() == (64,)
    copy.close()


def test_the_backup_file_is_0600_from_its_creation(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: the mode of the copy at the moment SQLite opens it to write."""
    target = tmp_path / "copy.db"
    seen: list[int] = []
    real_connect = sqlite3.connect

    def connect(database: object, *args: object, **kwargs: object) -> sqlite3.Connection:
        connection = real_connect(database, *args, **kwargs)  # type: ignore[arg-type]
        if Path(str(database)) == target:
            seen.append(stat.S_IMODE(target.stat().st_mode))
        return connection

    monkeypatch.setattr(offline.sqlite3, "connect", connect)
    old_umask = os.umask(0o022)
    try:
        size = offline.backup_database(load_settings(data_dir=data_dir), target)
    finally:
        os.umask(old_umask)
    assert size == target.stat().st_size > 0
    assert seen == [0o600]


def test_the_backup_never_follows_or_overwrites_what_is_at_the_path(
    data_dir: Path, tmp_path: Path
) -> None:
    settings = load_settings(data_dir=data_dir)
    planted = tmp_path / "planted"
    link = tmp_path / "link.db"
    link.symlink_to(planted)  # dangling: exists() says no, and a plain open follows it
    with pytest.raises(BadRequest, match="already exists"):
        offline.backup_database(settings, link)
    assert not planted.exists()
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"keep me")
    with pytest.raises(BadRequest, match="already exists"):
        offline.backup_database(settings, existing)
    assert existing.read_bytes() == b"keep me"


def test_a_failed_backup_leaves_no_partial_copy(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "missing")
    with pytest.raises(ConfigError, match="does not exist"):
        offline.backup_database(settings, tmp_path / "copy.db")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "legator.db").write_bytes(b"not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        offline.backup_database(load_settings(data_dir=corrupt), tmp_path / "copy.db")
    assert not (tmp_path / "copy.db").exists()
