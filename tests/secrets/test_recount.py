"""`legerd recount`: the per-writer usage totals (quotas) recomputed from the rows, on SQLite
and on the real PostgreSQL server, after they drifted the ways they do in practice: an old
replica (from before quotas) writing rows without counting them, and a counter edited by
hand."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from legator.secrets.crypto import Kek, generate_key
from legator.secrets.quota import row_weight
from legator.secrets.store import SqlStore
from tests.secrets.conftest import Backend, _pg_backend, _sqlite_backend
from tests.support import one_line_error, run_cli


@dataclass
class Target:
    backend: Backend
    args: list[str]  # where `legerd recount` finds the store


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "sqlite":
        return Target(_sqlite_backend(tmp_path / "secrets.db"), ["--state-dir", str(tmp_path)])
    url = request.getfixturevalue("pg_url")
    return Target(_pg_backend(url), ["--database-url", url])


def usage(raw: Callable[..., list[tuple[object, ...]]]) -> dict[str, tuple[int, int]]:
    rows = raw("SELECT writer, bytes, secrets FROM writer_usage", ())
    return {str(w): (int(b), int(s)) for w, b, s in rows if (int(b), int(s)) != (0, 0)}  # type: ignore[call-overload]


def recount(target: Target, *extra: str) -> dict[str, object]:
    result = run_cli("legerd", "recount", *target.args, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def fill(store: SqlStore) -> None:
    store.put("app/a", b"alpha", writer="alice@example.com")
    store.put("app/a", b"alpha-2", writer="bob@example.com")
    store.put("app/b", b"bravo", writer="bob@example.com")
    store.close()


def old_replica_put(target: Target, name: str, sealed: bytes) -> None:
    """What a replica from before quotas writes: the rows, without writer or counters."""
    target.backend.raw("INSERT INTO secrets (name, active, latest) VALUES (?, 1, 1)", (name,))
    target.backend.raw(
        "INSERT INTO versions (name, version, sealed) VALUES (?, 1, ?)", (name, sealed)
    )


def test_recount_restores_the_totals_the_rows_add_up_to(target: Target) -> None:
    kek = Kek(generate_key(), "test")
    fill(target.backend.open(kek))
    kept = usage(target.backend.raw)  # kept right by every write so far
    assert set(kept) == {"alice@example.com", "bob@example.com"}
    old_replica_put(target, "old/c", b"x" * 100)
    target.backend.raw(
        "UPDATE writer_usage SET bytes = bytes + 500, secrets = 7 WHERE writer = ?",
        ("alice@example.com",),
    )
    drifted = usage(target.backend.raw)

    report = recount(target)

    expected = {**kept, "": (row_weight("old/c", b"x" * 100), 1)}
    assert usage(target.backend.raw) == expected
    alice = "alice@example.com"
    assert report["changed"] == [
        {"writer": "", "bytes": {"before": 0, "after": expected[""][0]},
         "secrets": {"before": 0, "after": 1}},
        {"writer": alice, "bytes": {"before": drifted[alice][0], "after": kept[alice][0]},
         "secrets": {"before": 7, "after": 1}},
    ]  # fmt: skip
    assert recount(target)["changed"] == []  # a second run finds nothing to change


def test_recount_drops_the_totals_of_writers_with_no_rows_left(target: Target) -> None:
    kek = Kek(generate_key(), "test")
    fill(target.backend.open(kek))
    # An old replica deleted bob's secret without uncounting it.
    target.backend.raw("DELETE FROM versions WHERE writer = ?", ("bob@example.com",))
    target.backend.raw("DELETE FROM secrets WHERE name = ?", ("app/b",))
    recount(target)
    assert "bob@example.com" not in usage(target.backend.raw)
    assert recount(target)["changed"] == []


def test_recount_text_names_each_change(target: Target) -> None:
    fill(target.backend.open(Kek(generate_key(), "test")))
    target.backend.raw("UPDATE writer_usage SET bytes = 1 WHERE writer = ?", ("bob@example.com",))
    result = run_cli("legerd", "recount", *target.args)
    assert result.returncode == 0, result.stderr
    assert "1 writer(s) changed" in result.stdout
    assert "bob@example.com: bytes 1 -> " in result.stdout


def test_recount_of_a_missing_store_says_so(tmp_path: Path) -> None:
    error = one_line_error(run_cli("legerd", "recount", "--state-dir", str(tmp_path)), 3)
    assert f"no secrets store at {tmp_path / 'secrets.db'}" in error
    assert not (tmp_path / "secrets.db").exists()  # not created by looking


@pytest.mark.postgres
def test_recount_of_a_database_without_a_store_says_so(pg_url: str) -> None:
    error = one_line_error(run_cli("legerd", "recount", "--database-url", pg_url), 3)
    assert "no secrets store (schema legator_secrets)" in error


def test_recount_has_help() -> None:
    result = run_cli("legerd", "recount", "--help")
    assert result.returncode == 0
    assert "--database-url" in result.stdout and "--json" in result.stdout
