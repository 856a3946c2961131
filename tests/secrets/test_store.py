"""Encryption at rest: envelope keys, associated data, tampering, wrong keys, key rotation."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from legator.secrets.crypto import KEK_ENV, Kek, generate_key, load_kek
from legator.secrets.errors import KekError, SecretNotFound, StoreCorrupted
from legator.secrets.store import SecretStore
from tests.support import run_cli


@pytest.fixture
def kek(tmp_path: Path) -> Kek:
    return load_kek(tmp_path / "keys" / "main.key")


@pytest.fixture
def store(tmp_path: Path, kek: Kek) -> SecretStore:
    return SecretStore(tmp_path / "secrets.db", kek)


def raw(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None)


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


def test_swapped_ciphertexts_fail(tmp_path: Path, store: SecretStore) -> None:
    store.put("a", b"value-a")
    store.put("b", b"value-b")
    store.put("a", b"value-a2")
    with raw(tmp_path / "secrets.db") as db:
        sealed_b = db.execute("SELECT sealed FROM versions WHERE name='b'").fetchone()[0]
        sealed_a1 = db.execute(
            "SELECT sealed FROM versions WHERE name='a' AND version=1"
        ).fetchone()[0]
        db.execute("UPDATE versions SET sealed=? WHERE name='a' AND version=1", (sealed_b,))
        db.execute("UPDATE versions SET sealed=? WHERE name='a' AND version=2", (sealed_a1,))
    with pytest.raises(StoreCorrupted, match="failed authentication"):
        store.get("a", 1)  # another secret's ciphertext
    with pytest.raises(StoreCorrupted, match="failed authentication"):
        store.get("a", 2)  # another version's ciphertext
    assert store.get("b") == (b"value-b", 1)


def test_tampered_row_fails(tmp_path: Path, store: SecretStore) -> None:
    store.put("a", b"value")
    with raw(tmp_path / "secrets.db") as db:
        sealed = bytearray(db.execute("SELECT sealed FROM versions").fetchone()[0])
        sealed[-1] ^= 1
        db.execute("UPDATE versions SET sealed=?", (bytes(sealed),))
    with pytest.raises(StoreCorrupted):
        store.get("a")
    with raw(tmp_path / "secrets.db") as db:
        db.execute("UPDATE versions SET sealed=x'0102'")
    with pytest.raises(StoreCorrupted, match="malformed"):
        store.get("a")


def test_wrong_key_is_a_clear_error(tmp_path: Path, store: SecretStore) -> None:
    store.put("a", b"value")
    store.close()
    with pytest.raises(KekError, match="is not the one this store was sealed with"):
        SecretStore(tmp_path / "secrets.db", Kek(generate_key(), "test key"))


def test_versions(store: SecretStore) -> None:
    assert store.put("s", b"1") == 1
    assert store.put("s", b"1") == 1
    assert store.put("s", b"2") == 2
    assert store.info("s").active_version == 1
    store.activate("s", 2)
    store.delete_version("s", 1)
    assert store.put("s", b"1") == 3
    assert store.info("s").versions == [2, 3]
    store.delete("s")
    with pytest.raises(SecretNotFound):
        store.get("s")
    assert store.put("s", b"again") == 1  # a deleted secret starts afresh
    assert [i.name for i in store.list()] == ["s"]


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
    done = run_cli(
        "legerd", "rotate-kek", "--state-dir", str(state), "--new-key-file", str(new_file), env=env
    )
    assert done.returncode == 0, done.stderr
    assert "1 stored value(s) verified" in done.stdout
    assert SecretStore(state / "secrets.db", Kek(new, "new")).get("a") == (b"alpha", 1)
    with pytest.raises(KekError):
        SecretStore(state / "secrets.db", Kek(old, "old"))
    assert not (state / "keys").exists()  # nothing written where the key did not come from
