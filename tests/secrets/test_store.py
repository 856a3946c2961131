"""Encryption at rest: envelope keys, associated data, tampering, wrong keys, key rotation;
the behaviour tests run on both backends (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from legator.secrets.crypto import KEK_ENV, Kek, generate_key, load_kek
from legator.secrets.errors import (
    InvalidRequest,
    KekError,
    SecretNotFound,
    StoreCorrupted,
    VersionClaimed,
)
from legator.secrets.pgstore import PgSecretStore, libpq_url
from legator.secrets.store import SecretStore, SourceSecret
from tests.secrets.conftest import Backend
from tests.support import run_cli


@pytest.fixture
def kek(tmp_path: Path) -> Kek:
    return load_kek(tmp_path / "keys" / "main.key")


@pytest.fixture
def store(tmp_path: Path, kek: Kek) -> SecretStore:
    return SecretStore(tmp_path / "secrets.db", kek)


def test_key_file_is_created_private(tmp_path: Path, kek: Kek) -> None:
    path = tmp_path / "keys" / "main.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_kek(path).key == kek.key  # the same key next start
    path.chmod(0o644)
    with pytest.raises(KekError, match="readable by others"):
        load_kek(path)


def test_kek_from_env_and_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_key()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "legerd-kek").write_text(key.hex())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    loaded = load_kek(tmp_path / "absent.key", create=False)
    assert loaded.key == key and "credential" in loaded.source
    monkeypatch.setenv(KEK_ENV, "zz")
    with pytest.raises(KekError, match="hex"):
        load_kek(tmp_path / "absent.key")
    monkeypatch.setenv(KEK_ENV, "ab" * 16)
    with pytest.raises(KekError, match="32-byte"):
        load_kek(tmp_path / "absent.key")
    assert not (tmp_path / "absent.key").exists()


def test_values_are_encrypted_at_rest(tmp_path: Path, store: SecretStore) -> None:
    store.put("db/password", b"correct-horse-battery-staple")
    store.close()
    for name in os.listdir(tmp_path):
        if name.startswith("secrets.db"):
            assert b"correct-horse" not in (tmp_path / name).read_bytes()


def test_values_are_encrypted_at_rest_in_postgresql(pg_url: str, kek: Kek) -> None:
    store = PgSecretStore(pg_url, kek)
    store.put("db/password", b"correct-horse-battery-staple")
    store.close()
    with psycopg.connect(libpq_url(pg_url)) as db:
        rows = db.execute("SELECT sealed FROM legator_secrets.versions").fetchall()
        keys = db.execute("SELECT wrapped FROM legator_secrets.data_keys").fetchall()
    assert len(rows) == 1 and b"correct-horse" not in rows[0][0]
    assert len(keys) == 1 and kek.key not in keys[0][0]


def test_swapped_ciphertexts_fail(backend: Backend, kek: Kek) -> None:
    store = backend.open(kek)
    store.put("a", b"value-a")
    store.put("b", b"value-b")
    store.put("a", b"value-a2")
    sealed_b = backend.raw("SELECT sealed FROM versions WHERE name='b'", ())[0][0]
    sealed_a1 = backend.raw("SELECT sealed FROM versions WHERE name='a' AND version=1", ())[0][0]
    backend.raw("UPDATE versions SET sealed=? WHERE name='a' AND version=1", (sealed_b,))
    backend.raw("UPDATE versions SET sealed=? WHERE name='a' AND version=2", (sealed_a1,))
    with pytest.raises(StoreCorrupted, match="failed authentication"):
        store.get("a", 1)  # another secret's ciphertext
    with pytest.raises(StoreCorrupted, match="failed authentication"):
        store.get("a", 2)  # another version's ciphertext
    assert store.get("b") == (b"value-b", 1)
    with pytest.raises(StoreCorrupted):
        store.verify_all()
    store.close()


def test_tampered_row_fails(backend: Backend, kek: Kek) -> None:
    store = backend.open(kek)
    store.put("a", b"value")
    sealed = bytearray(backend.raw("SELECT sealed FROM versions", ())[0][0])
    sealed[-1] ^= 1
    backend.raw("UPDATE versions SET sealed=?", (bytes(sealed),))
    with pytest.raises(StoreCorrupted):
        store.get("a")
    backend.raw("UPDATE versions SET sealed=?", (b"\x01\x02",))
    with pytest.raises(StoreCorrupted, match="malformed"):
        store.get("a")
    store.close()


def test_wrong_key_is_a_clear_error(backend: Backend, kek: Kek) -> None:
    store = backend.open(kek)
    store.put("a", b"value")
    store.close()
    with pytest.raises(KekError, match="is not the one this store was sealed with"):
        backend.open(Kek(generate_key(), "test key"))
    assert backend.open(kek).get("a") == (b"value", 1)


def test_versions(backend: Backend, kek: Kek) -> None:
    store = backend.open(kek)
    assert store.put("s", b"1") == 1
    assert store.put("s", b"1") == 1
    assert store.put("s", b"2") == 2
    assert store.info("s").active_version == 1
    store.activate("s", 2)
    store.delete_version("s", 1)
    assert store.put("s", b"1") == 3
    assert store.info("s").versions == [2, 3]
    with pytest.raises(VersionClaimed):
        store.create_version("s", 1, b"reused")  # deleted, yet never reused
    store.create_version("s", 7, b"seven")
    assert store.info("s").active_version == 7 and store.put("s", b"eight") == 8
    with pytest.raises(InvalidRequest, match="active"):
        store.delete_version("s", 7)
    store.delete("s")
    with pytest.raises(SecretNotFound):
        store.get("s")
    assert store.put("s", b"again") == 1  # a deleted secret starts afresh
    assert [i.name for i in store.list()] == ["s"]
    store.close()


def test_import_copies_versions_deletions_and_activation_under_this_stores_key(
    backend: Backend, kek: Kek, tmp_path: Path
) -> None:
    source = SecretStore(tmp_path / "old" / "secrets.db", Kek(generate_key(), "old key"))
    for value in (b"v1", b"v2", b"v3"):
        source.put("db/password", value)
    source.activate("db/password", 3)
    source.delete_version("db/password", 2)
    source.put("api/token", b"t0k3n")
    source.put("clash", b"theirs")
    target = backend.open(kek)
    target.put("api/token", b"t0k3n")  # the same secret: here already
    target.put("clash", b"ours")
    target.put("only-here", b"h")

    audited: list[SourceSecret] = []
    report = target.import_from(source, audited.append)
    assert (report.imported, report.unchanged, report.conflicts) == (
        ["db/password"],
        ["api/token"],
        ["clash"],
    )
    # The hook (the audit record) is called for the secret copied, and only for it.
    assert [(s.name, s.versions, s.deleted, s.active) for s in audited] == [
        ("db/password", [1, 3], [2], 3)
    ]
    assert "v1" not in repr(audited)  # a secret being imported never shows its values
    assert target.info("db/password") == source.info("db/password")
    assert target.get("db/password") == (b"v3", 3) and target.get("db/password", 1) == (b"v1", 1)
    with pytest.raises(SecretNotFound):
        target.get("db/password", 2)
    again = target.import_from(source, audited.append)  # an interrupted import is run again
    assert len(audited) == 1  # nothing copied, nothing recorded
    assert (again.imported, again.unchanged, again.conflicts) == (
        [],
        ["api/token", "db/password"],
        ["clash"],
    )
    with pytest.raises(VersionClaimed):
        target.create_version("db/password", 2, b"reused")  # deleted there, claimed here too
    assert target.put("db/password", b"v4") == 4
    assert target.get("clash") == (b"ours", 1) and target.get("only-here") == (b"h", 1)
    # Sealed under this store's data key: the rows are not the source's bytes.
    (copied,) = backend.raw(
        "SELECT sealed FROM versions WHERE name = ? AND version = 1", ("db/password",)
    )
    with sqlite3.connect(source.path) as old:
        (original,) = old.execute(
            "SELECT sealed FROM versions WHERE name = 'db/password' AND version = 1"
        ).fetchall()
    assert bytes(copied[0]) != bytes(original[0])

    source.close()
    target.close()


def test_every_put_and_delete_is_audited_even_when_it_changes_nothing(
    backend: Backend, kek: Kek
) -> None:
    store = backend.open(kek)
    audited: list[tuple[str, int]] = []

    def hook(call: str) -> Callable[[int], None]:
        return lambda version: audited.append((call, version))

    assert store.put("s", b"1", hook("put")) == 1
    assert store.put("s", b"1", hook("put")) == 1  # the same value: no new version
    assert store.put("s", b"2", hook("put")) == 2
    assert store.put("s", b"2", hook("put")) == 2
    store.delete("s", hook("delete"))
    store.delete("s", hook("delete"))  # gone already: a no-op, as in setec
    store.delete("never", hook("delete"))
    assert audited == [
        ("put", 1),
        ("put", 1),
        ("put", 2),
        ("put", 2),
        ("delete", 0),
        ("delete", 0),
        ("delete", 0),
    ]
    assert store.list() == []
    store.close()


def test_mutation_rolls_back_when_its_audit_hook_fails(backend: Backend, kek: Kek) -> None:
    store = backend.open(kek)
    store.put("s", b"1")

    def failing_audit(version: int) -> None:
        raise OSError("audit log unavailable")

    for mutate in (
        lambda: store.put("s", b"1", failing_audit),
        lambda: store.put("s", b"2", failing_audit),
        lambda: store.put("t", b"1", failing_audit),
        lambda: store.create_version("s", 5, b"5", failing_audit),
        lambda: store.delete("s", failing_audit),
    ):
        with pytest.raises(OSError, match="audit log unavailable"):
            mutate()
    assert [(i.name, i.versions, i.active_version) for i in store.list()] == [("s", [1], 1)]
    assert store.put("s", b"2") == 2  # nothing was claimed by the failed attempts
    store.close()


def test_an_import_interrupted_by_its_audit_hook_keeps_each_secret_whole(
    backend: Backend, kek: Kek, tmp_path: Path
) -> None:
    source = SecretStore(tmp_path / "old" / "secrets.db", Kek(generate_key(), "old key"))
    for name in ("a", "b", "c"):
        source.put(name, name.encode())
        source.put(name, name.encode() * 2)
    target = backend.open(kek)
    audited: list[str] = []

    def audit_until_b(secret: SourceSecret) -> None:
        if secret.name == "b":
            raise OSError("audit log unavailable")
        audited.append(secret.name)

    with pytest.raises(OSError, match="audit log unavailable"):
        target.import_from(source, audit_until_b)
    # "a" is in with its record; "b" (its rows written, then its record failed) is not at all.
    assert audited == ["a"]
    assert [(i.name, i.versions) for i in target.list()] == [("a", [1, 2])]
    assert backend.raw("SELECT version FROM versions WHERE name = ?", ("b",)) == []
    report = target.import_from(source, lambda secret: audited.append(secret.name))
    assert (report.imported, report.unchanged) == (["b", "c"], ["a"])
    assert audited == ["a", "b", "c"]
    source.close()
    target.close()


def test_rotation_in_the_store(backend: Backend, kek: Kek) -> None:
    store = backend.open(kek)
    store.put("a", b"alpha")
    new = Kek(generate_key(), "new key")
    store.add_kek(new, kek)
    assert backend.open(kek).get("a") == (b"alpha", 1)  # both open during the rollout
    assert backend.open(new).get("a") == (b"alpha", 1)
    store.drop_other_keks(new)
    store.close()
    with pytest.raises(KekError):
        backend.open(kek)
    rotated = backend.open(new)
    assert rotated.verify_all() == 1
    with pytest.raises(KekError, match="no data key"):
        rotated.add_kek(Kek(generate_key(), "third"), kek)
    rotated.close()


@pytest.mark.postgres
def test_replicas_starting_together_share_one_data_key(pg_url: str, kek: Kek) -> None:
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PgSecretStore(pg_url, kek), range(4)))
    with psycopg.connect(libpq_url(pg_url)) as db:
        assert db.execute("SELECT count(*) FROM legator_secrets.data_keys").fetchone() == (1,)

    def put(i: int) -> int:
        return stores[i % 4].put("shared", f"value {i}".encode())

    with ThreadPoolExecutor(8) as pool:
        versions = sorted(pool.map(put, range(40)))
    assert versions == list(range(1, 41))  # no version given twice, none lost
    assert stores[3].get("shared", 40)[1] == 40
    for store in stores:
        store.close()


def test_rotate_kek(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"LEGERD_KEK": ""}
    first = SecretStore(state / "secrets.db", load_kek(state / "keys" / "main.key"))
    first.put("a", b"alpha")
    first.put("b", b"beta")
    first.close()
    old_key = (state / "keys" / "main.key").read_text()
    result = run_cli("legerd", "rotate-kek", "--state-dir", str(state), env=env)
    assert result.returncode == 0, result.stderr
    assert "2 stored value(s) verified" in result.stdout
    new_key = (state / "keys" / "main.key").read_text()
    assert new_key != old_key
    assert (state / "keys" / "main.key").stat().st_mode & 0o777 == 0o600
    reopened = SecretStore(state / "secrets.db", load_kek(state / "keys" / "main.key"))
    assert reopened.get("a") == (b"alpha", 1) and reopened.verify_all() == 2
    reopened.close()
    with pytest.raises(KekError):
        SecretStore(state / "secrets.db", Kek(bytes.fromhex(old_key), "old"))


def test_rotate_kek_from_env_needs_a_new_key_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = generate_key()
    store = SecretStore(state / "secrets.db", Kek(old, "env"))
    store.put("a", b"alpha")
    store.close()
    env = {"LEGERD_KEK": old.hex()}
    refused = run_cli("legerd", "rotate-kek", "--state-dir", str(state), env=env)
    assert refused.returncode == 1 and "--new-key-file" in refused.stderr
    new = generate_key()
    new_file = tmp_path / "new.key"
    new_file.write_text(new.hex())
    new_file.chmod(0o644)
    rotate = ("legerd", "rotate-kek", "--state-dir", str(state), "--new-key-file", str(new_file))
    readable = run_cli(*rotate, env=env)
    assert readable.returncode == 1 and "readable by others" in readable.stderr
    assert SecretStore(state / "secrets.db", Kek(old, "old")).get("a") == (b"alpha", 1)
    new_file.chmod(0o600)
    done = run_cli(*rotate, env=env)
    assert done.returncode == 0, done.stderr
    assert "1 stored value(s) verified" in done.stdout
    assert f"install it in ${KEK_ENV} before restarting" in done.stdout
    assert SecretStore(state / "secrets.db", Kek(new, "new")).get("a") == (b"alpha", 1)
    with pytest.raises(KekError):
        SecretStore(state / "secrets.db", Kek(old, "old"))
    assert not (state / "keys").exists()  # nothing written where the key did not come from


def test_rotate_kek_with_a_new_key_file_replaces_main_key(tmp_path: Path) -> None:
    # The current key is keys/main.key: the new key from the file must land there, or the
    # next `legerd serve` (which reads main.key) cannot open the store.
    state = tmp_path / "state"
    main_key = state / "keys" / "main.key"
    store = SecretStore(state / "secrets.db", load_kek(main_key))
    store.put("a", b"alpha")
    store.close()
    new = generate_key()
    new_file = tmp_path / "new.key"
    new_file.write_text(new.hex() + "\n")
    new_file.chmod(0o600)
    done = run_cli(
        "legerd",
        "rotate-kek",
        "--state-dir",
        str(state),
        "--new-key-file",
        str(new_file),
        env={"LEGERD_KEK": ""},
    )
    assert done.returncode == 0, done.stderr
    assert f"copied from {new_file}" in done.stdout
    assert bytes.fromhex(main_key.read_text().strip()) == new
    assert main_key.stat().st_mode & 0o777 == 0o600
    reopened = SecretStore(state / "secrets.db", load_kek(main_key, create=False))
    assert reopened.get("a") == (b"alpha", 1)
    reopened.close()


def test_libpq_url_from_the_control_planes_url() -> None:
    assert (
        libpq_url("postgresql+asyncpg://u:p%40ss@db:5433/legator?ssl=require")
        == "postgresql://u:p%40ss@db:5433/legator?sslmode=require"
    )
    assert libpq_url("postgresql+asyncpg://db/x") == "postgresql://db/x"
