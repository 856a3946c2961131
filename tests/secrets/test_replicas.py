"""Control-plane replicas on one PostgreSQL share the secrets store under one KEK."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

import pytest

from legator.secrets.client import Client
from legator.secrets.crypto import Kek, generate_key, load_key_file
from legator.secrets.store import SecretStore
from tests.support import LiveServer, free_port, live_server, run_cli

pytestmark = pytest.mark.postgres
PREFIX = "/api/v1/secrets"


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def test_a_secret_put_through_one_replica_is_read_through_another(
    pg_url: str, tmp_path: Path
) -> None:
    kek = secrets.token_hex(32)
    a = LiveServer(tmp_path / "a", database_url=pg_url, secrets_kek=kek, replica_id="a").start()
    b = LiveServer(tmp_path / "b", database_url=pg_url, secrets_kek=kek, replica_id="b").start()
    try:
        key = a.admin_key  # the first start bootstrapped the admin in the shared database
        with (
            Client(a.url, api_key=key, prefix=PREFIX) as via_a,
            Client(b.url, api_key=key, prefix=PREFIX) as via_b,
        ):
            assert via_a.put("db/password", b"hunter2") == 1
            assert via_b.get("db/password") == (b"hunter2", 1)
            # Versions are decided in the shared database: B's put is version 2, and A sees
            # the activation B made.
            assert via_b.put("db/password", b"hunter3") == 2
            assert via_b.get_if_changed("db/password", 1) is None
            via_b.activate("db/password", 2)
            assert via_a.get_if_changed("db/password", 1) == (b"hunter3", 2)
            assert [(i.name, i.versions, i.active_version) for i in via_a.list()] == [
                ("db/password", [1, 2], 2)
            ]
        with a.client(key) as api:
            # The setec wire format is the same as on one replica.
            got = api.post(f"{PREFIX}/get", json={"Name": "db/password", "Version": 0})
            assert got.json() == {"Value": b64(b"hunter3"), "Version": 2}
            actions = [
                e["action"]
                for e in api.get("/api/v1/audit", params={"limit": 50}).json()["events"]
                if e["action"].startswith("secrets.")
            ]
            assert "secrets.put" in actions and "secrets.activate" in actions
    finally:
        b.stop()
        a.stop()
    for data_dir in (tmp_path / "a", tmp_path / "b"):
        assert not (data_dir / "secrets").exists()  # nothing on the replicas' disks


def test_a_replica_with_another_kek_or_none_fails_clearly(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kek = secrets.token_hex(32)
    # A per-replica SQLite store from before the move to PostgreSQL: left alone, and said so.
    old = SecretStore(tmp_path / "a" / "secrets" / "secrets.db", Kek(generate_key(), "old"))
    old.put("from-before", b"x")
    old.close()
    with (
        live_server(tmp_path / "a", database_url=pg_url, secrets_kek=kek) as a,
        a.client(a.admin_key) as api,
    ):
        assert api.post(f"{PREFIX}/put", json={"Name": "k", "Value": b64(b"v")}).json() == 1
        assert [i["Name"] for i in api.post(f"{PREFIX}/list", json={}).json()] == ["k"]
    assert "the SQLite store from before is not used" in capsys.readouterr().out
    env = {"LEGATOR_DATABASE_URL": pg_url, "LEGATOR_ADDR": f"127.0.0.1:{free_port()}"}
    other = run_cli("legator", "serve", env={**env, "LEGATOR_SECRETS_KEK": secrets.token_hex(32)})
    assert other.returncode == 2
    assert "secrets store:" in other.stderr and "not the one" in other.stderr
    missing = run_cli("legator", "serve", env=env)
    assert missing.returncode == 2
    assert "LEGATOR_SECRETS_KEK: required with a PostgreSQL" in missing.stderr
    for failed in (other, missing):
        assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_the_sqlite_store_from_before_is_imported_by_the_cli(pg_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "a"
    old = SecretStore(
        data_dir / "secrets" / "secrets.db",
        load_key_file(data_dir / "secrets" / "keys" / "main.key"),
    )
    old.put("from-before", b"s3cr3t-value")
    old.put("clash", b"old value")
    old.close()
    kek = secrets.token_hex(32)
    env = {
        "LEGATOR_DATABASE_URL": pg_url,
        "LEGATOR_SECRETS_KEK": kek,
        "LEGATOR_DATA_DIR": str(data_dir),
    }
    importing = ("legator", "secrets", "import-sqlite")
    with (
        live_server(data_dir, database_url=pg_url, secrets_kek=kek) as a,
        a.client(a.admin_key) as api,
    ):
        assert api.post(f"{PREFIX}/put", json={"Name": "clash", "Value": b64(b"new")}).json() == 1
        done = run_cli(*importing, "--json", env=env)  # while the replica serves
        assert done.returncode == 4, done.stderr  # a conflict
        assert json.loads(done.stdout) == {
            "imported": ["from-before"],
            "unchanged": [],
            "conflicts": ["clash"],
        }
        assert "clash" in done.stderr
        got = api.post(f"{PREFIX}/get", json={"Name": "from-before"}).json()
        assert base64.b64decode(got["Value"]) == b"s3cr3t-value"
        clash = api.post(f"{PREFIX}/get", json={"Name": "clash"}).json()
        assert base64.b64decode(clash["Value"]) == b"new"  # left alone
        events = api.get("/api/v1/audit", params={"action": "secrets.import*"}).json()["events"]
        # One event per secret copied (written with it), then the import's summary.
        assert [(e["actor"], e["action"], e["target"]) for e in events] == [
            ("cli", "secrets.import.summary", str(data_dir / "secrets" / "secrets.db")),
            ("cli", "secrets.import", "from-before"),
        ]
        assert events[1]["details"]["versions"] == [1]
        assert (events[0]["details"]["imported"], events[0]["details"]["conflicts"]) == (
            ["from-before"],
            ["clash"],
        )
        assert "s3cr3t" not in json.dumps(events)  # names, never values
    table = run_cli(*importing, env=env)
    assert table.returncode == 4 and "1 unchanged, 1 conflict(s)" in table.stdout
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text(secrets.token_hex(32))
    wrong_key.chmod(0o600)
    refused = run_cli(*importing, "--key-file", str(wrong_key), env=env)
    assert refused.returncode == 1 and "not the one this store was sealed with" in refused.stderr
    absent = run_cli(*importing, str(tmp_path / "nowhere"), env=env)
    assert absent.returncode == 2 and "no SQLite secrets store at" in absent.stderr
    no_kek = run_cli(*importing, env={**env, "LEGATOR_SECRETS_KEK": ""})
    assert no_kek.returncode == 2 and "LEGATOR_SECRETS_KEK: required" in no_kek.stderr
    no_key_file = run_cli(*importing, "--key-file", str(tmp_path / "absent.key"), env=env)
    assert no_key_file.returncode == 2 and "no key file at" in no_key_file.stderr
    garbage = tmp_path / "garbage"
    (garbage / "keys").mkdir(parents=True)
    (garbage / "secrets.db").write_text("not a database")
    broken = run_cli(*importing, str(garbage), "--key-file", str(wrong_key), env=env)
    assert broken.returncode == 1 and "not a readable SQLite secrets store" in broken.stderr
    for failed in (refused, absent, no_kek, no_key_file, broken):
        assert "Traceback" not in failed.stderr


def test_rotating_the_kek_replica_by_replica(pg_url: str, tmp_path: Path) -> None:
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    new_file = tmp_path / "new.key"
    new_file.write_text(new + "\n")
    new_file.chmod(0o600)
    env = {"LEGATOR_DATABASE_URL": pg_url, "LEGATOR_SECRETS_KEK": old}
    rotate = ("legator", "secrets", "rotate-kek")
    a = LiveServer(tmp_path / "a", database_url=pg_url, secrets_kek=old).start()
    try:
        with Client(a.url, api_key=a.admin_key, prefix=PREFIX) as via_a:
            via_a.put("app/token", b"t0k3n")
            assert run_cli(*rotate, env=env).returncode == 2  # which step?
            started = run_cli(*rotate, "--new-key-file", str(new_file), env=env)
            assert started.returncode == 0, started.stderr
            assert "1 stored value(s) verified" in started.stdout
            # Mid-rollout: a replica still on the old key and one on the new key both work.
            with (
                live_server(tmp_path / "b", database_url=pg_url, secrets_kek=new) as b,
                Client(b.url, api_key=a.admin_key, prefix=PREFIX) as via_b,
            ):
                assert via_b.get("app/token") == (b"t0k3n", 1)
                via_b.put("app/token", b"t0k3n-2")
                assert via_a.get("app/token", 2) == (b"t0k3n-2", 2)
    finally:
        a.stop()
    finished = run_cli(*rotate, "--finish", env={**env, "LEGATOR_SECRETS_KEK": new})
    assert finished.returncode == 0, finished.stderr
    assert "2 stored value(s) verified" in finished.stdout
    with (
        live_server(tmp_path / "c", database_url=pg_url, secrets_kek=new) as c,
        c.client(a.admin_key) as api,
    ):
        events = api.get("/api/v1/audit", params={"action": "secrets.rotate_kek"}).json()
        steps = [e["details"]["step"] for e in events["events"]]
        assert steps == ["finish", "start"] and {e["actor"] for e in events["events"]} == {"cli"}
    stale = run_cli("legator", "serve", env={**env, "LEGATOR_ADDR": f"127.0.0.1:{free_port()}"})
    assert stale.returncode == 2 and "not the one this store was sealed with" in stale.stderr
