"""Fixes from a review of legerd: crafted requests, the version range, the two backends,
dual-stack listeners, pattern anchoring, file modes and key rotation's durability. Each test
failed before its fix."""

from __future__ import annotations

import base64
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from legator.cli.legerd import app as legerd_cli
from legator.secrets.acl import AclError, Action, Policy, Rule
from legator.secrets.crypto import Kek, generate_key, load_kek
from legator.secrets.errors import InvalidRequest, KekError
from legator.secrets.identity import PeerCred, unix_caller
from legator.secrets.pgstore import PgSecretStore
from legator.secrets.server import (
    ConfigProblem,
    Legerd,
    LegerdConfig,
    bind_sockets,
    rotation_lock,
)
from legator.secrets.service import MAX_VERSION
from legator.secrets.store import SecretStore, SqlStore
from tests.secrets.conftest import (
    SETEC_HEADERS,
    Backend,
    FakeTailscale,
    LegerdThread,
    make_config,
    whois_user,
)
from tests.support import free_port, fresh_pg_database

ALL = ["get", "info", "put", "activate", "delete", "create-version"]
ADMIN_IP = "127.0.0.3"


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


@pytest.fixture
def kek() -> Kek:
    return Kek(generate_key(), "test key")


@pytest.fixture
def admin(legerd: LegerdThread, tailscale: FakeTailscale) -> Iterator[httpx.Client]:
    tailscale.identities[ADMIN_IP] = whois_user(
        "admin@example.com", [{"action": ALL, "secret": ["*"]}]
    )
    with legerd.tcp(ADMIN_IP) as client:
        yield client


# A crafted request is a 400, never a 500.


def test_deeply_nested_json_is_a_bad_request(admin: httpx.Client) -> None:
    depth = 100_000  # far past the JSON parser's recursion limit, well under 2 MiB
    body = b'{"Name": ' + b"[" * depth + b"]" * depth + b"}"
    response = admin.post("/api/get", content=body)
    assert (response.status_code, response.text) == (400, "bad request\n")


# Versions: one range that both backends store, and a clear error at its top.


def test_the_highest_version_is_stored_by_both_backends(backend: Backend, kek: Kek) -> None:
    store = backend.open(kek)
    try:
        store.create_version("top", MAX_VERSION, b"highest")
        assert store.get("top", MAX_VERSION) == (b"highest", MAX_VERSION)
        assert store.info("top").active_version == MAX_VERSION
        with pytest.raises(InvalidRequest, match="highest version"):
            store.put("top", b"one more")
        assert store.info("top").versions == [MAX_VERSION]
    finally:
        store.close()


def test_a_put_past_the_highest_version_is_a_bad_request(admin: httpx.Client) -> None:
    created = admin.post(
        "/api/create-version", json={"Name": "top", "Version": MAX_VERSION, "Value": b64(b"a")}
    )
    assert created.status_code == 200, created.text
    response = admin.post("/api/put", json={"Name": "top", "Value": b64(b"b")})
    assert response.status_code == 400
    assert "highest version" in response.text
    beyond = admin.post(
        "/api/create-version",
        json={"Name": "beyond", "Version": MAX_VERSION + 1, "Value": b64(b"c")},
    )
    assert beyond.status_code == 400 and "at most" in beyond.text


# The two backends list secrets in the same (setec's byte-wise) order.


@pytest.fixture
def icu_pg_url() -> Iterator[str]:
    """A fresh database whose default collation is ICU's en-US (case and punctuation
    insensitive at the first level), as many PostgreSQL installations have."""
    icu = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    with fresh_pg_database(icu) as url:
        yield url


NAMES = ["b", "B", "a", "A-1", "a-2", "_x", "Z"]


def listed(store: SqlStore) -> list[str]:
    for name in NAMES:
        store.put(name, name.encode())
    return [info.name for info in store.list()]


@pytest.mark.postgres
def test_both_backends_list_in_byte_order(icu_pg_url: str, tmp_path: Path, kek: Kek) -> None:
    sqlite, pg = SecretStore(tmp_path / "secrets.db", kek), PgSecretStore(icu_pg_url, kek)
    try:
        assert listed(sqlite) == sorted(NAMES)
        assert listed(pg) == sorted(NAMES)
    finally:
        sqlite.close()
        pg.close()


# An IPv4 caller of a dual-stack listener is asked about by its IPv4 address.


def test_ipv4_caller_of_a_dual_stack_listener_is_identified(
    tmp_path: Path, shared_dir: Path, tailscale: FakeTailscale
) -> None:
    port = free_port()
    config = make_config(tmp_path / "state", shared_dir, tailscale, listen=f"[::]:{port}")
    tailscale.identities["127.0.0.2"] = whois_user(
        "alice@example.com", [{"action": ["put", "get"], "secret": ["*"]}]
    )
    with (
        LegerdThread(config),
        httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            transport=httpx.HTTPTransport(local_address="127.0.0.2"),
            headers=SETEC_HEADERS,
        ) as client,
    ):
        response = client.post("/api/put", json={"Name": "a", "Value": b64(b"v")})
    assert (response.status_code, response.text) == (200, "1")
    assert tailscale.calls[-1].startswith("127.0.0.2:")


# Patterns match whole names: "$" would also match before a final newline.


def test_patterns_do_not_match_a_trailing_newline(tmp_path: Path) -> None:
    rule = Rule.build(["get"], ["prod/db", "web/*"])
    assert rule.allows(Action.GET, "prod/db") and rule.allows(Action.GET, "web/x")
    assert not rule.allows(Action.GET, "prod/db\n")
    path = tmp_path / "acl.json"
    path.write_text('[{"principal": "tag:prod", "action": ["get"], "secret": ["*"]}]')
    assert Policy.load(path).rules_for(["tag:prod\n"]) == []
    own = unix_caller(PeerCred(pid=1, uid=os.getuid() or 65534, gid=0), Policy())
    namespace = own.principal.removeprefix("unix:")
    assert own.can(Action.GET, f"leger/{namespace}/x")
    assert not own.can(Action.GET, f"leger/{namespace}/x\n")


# The store's files are private from the start, whatever the process umask.


def test_store_files_are_private_whatever_the_umask(tmp_path: Path, kek: Kek) -> None:
    previous = os.umask(0o022)
    try:
        store = SecretStore(tmp_path / "secrets.db", kek)
        store.put("a", b"value")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("secrets.db*")}
        store.close()
    finally:
        os.umask(previous)
    assert {"secrets.db", "secrets.db-wal"} <= modes.keys()
    assert modes == dict.fromkeys(modes, 0o600)


# Key rotation: the new key file is on disk for good before the old key stops opening
# the store.


def test_rotate_kek_makes_the_new_key_file_durable_before_dropping_the_old_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    monkeypatch.delenv("LEGERD_KEK", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    store = SecretStore(state / "secrets.db", load_kek(state / "keys" / "main.key"))
    store.put("a", b"alpha")
    store.close()
    keys_dir = (state / "keys").resolve()
    events: list[str] = []
    real_fsync, real_drop = os.fsync, SqlStore.drop_other_keks

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) and Path(f"/proc/self/fd/{fd}").resolve() == (
            keys_dir
        ):
            events.append("keys directory synced")
        real_fsync(fd)

    def drop_other_keks(self: SqlStore, keep: Kek) -> None:
        events.append("old key dropped")
        real_drop(self, keep)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(SqlStore, "drop_other_keks", drop_other_keks)
    result = CliRunner().invoke(legerd_cli, ["rotate-kek", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert events == ["keys directory synced", "old key dropped"]


# The policy file grants access: one that others may write is refused, as a readable key is.


def test_a_policy_file_others_may_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "acl.json"
    path.write_text('[{"principal": "unix:*", "action": ["get"], "secret": ["*"]}]')
    for mode in (0o666, 0o664, 0o646):
        path.chmod(mode)
        with pytest.raises(AclError, match=f"writable by others \\(mode {mode:o}\\)"):
            Policy.load(path)
    path.chmod(0o644)
    assert len(Policy.load(path).entries) == 1


# The unix socket: a second legerd does not take over a live one, and the directory legerd
# creates for it lets the local users it serves reach it.


def test_a_second_legerd_does_not_take_over_a_live_socket(
    tmp_path: Path, shared_dir: Path, tailscale: FakeTailscale
) -> None:
    first = make_config(tmp_path / "one", shared_dir, tailscale)
    with LegerdThread(first) as running:
        second = make_config(tmp_path / "two", shared_dir, tailscale)
        with pytest.raises(ConfigProblem, match="already serving"):
            Legerd(second)
        with running.unix() as client:
            assert client.post("/api/list", content=b"{}").status_code == 200


def test_a_stale_socket_file_is_replaced(tmp_path: Path, shared_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(shared_dir / "legerd.sock"))
    stale.close()  # the file stays, nobody listens: what a killed legerd leaves
    config = make_config(tmp_path / "s", shared_dir, None, dev=True)
    with LegerdThread(config) as running, running.unix() as client:
        assert client.post("/api/list", content=b"{}").status_code == 200


def test_the_socket_directory_legerd_creates_lets_local_users_in(tmp_path: Path) -> None:
    config = LegerdConfig(state_dir=tmp_path / "state", socket_path=tmp_path / "run" / "s.sock")
    previous = os.umask(0o077)  # what `legerd serve` runs under
    try:
        sockets = bind_sockets(config)
    finally:
        os.umask(previous)
    for sock in sockets:
        sock.close()
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "run" / "s.sock").stat().st_mode) == 0o666


# Every call gets its audit line, an activate that changes nothing included (as a put or a
# delete that changes nothing does).


def test_activating_the_active_version_is_audited(backend: Backend, kek: Kek) -> None:
    store = backend.open(kek)
    try:
        store.put("s", b"one")
        recorded: list[int] = []
        store.activate("s", 1, recorded.append)
        assert recorded == [1]
    finally:
        store.close()


def test_activate_of_the_active_version_is_in_the_audit_log(
    legerd: LegerdThread, admin: httpx.Client
) -> None:
    admin.post("/api/put", json={"Name": "s", "Value": b64(b"one")})
    response = admin.post("/api/activate", json={"Name": "s", "Version": 1})
    assert (response.status_code, response.text) == (200, "{}")
    activations = [line for line in legerd.audit_lines if line["action"] == "activate"]
    assert [(a["secret"], a["version"], a["authorized"]) for a in activations] == [("s", 1, True)]


# setec's API: "ListRequest (empty, send null or {})"; Go decodes a null body as an empty
# request for every call.


def test_a_null_body_is_an_empty_request(admin: httpx.Client) -> None:
    admin.post("/api/put", json={"Name": "a", "Value": b64(b"v")})
    response = admin.post("/api/list", content=b"null")
    assert (response.status_code, response.json()) == (
        200,
        [{"Name": "a", "Versions": [1], "ActiveVersion": 1}],
    )
    nameless = admin.post("/api/get", content=b"null")
    assert (nameless.status_code, nameless.text) == (400, "bad request: secret name is required\n")
    assert admin.post("/api/list", content=b"[]").status_code == 400


# Rotation never leaves the data key wrapped under no key, and a store whose data key is gone
# is an error, not a fresh data key that opens none of its values.


def test_dropping_the_last_wrapping_of_the_data_key_is_refused(backend: Backend, kek: Kek) -> None:
    store = backend.open(kek)
    store.put("a", b"alpha")
    with pytest.raises(KekError, match="not wrapped under"):
        store.drop_other_keks(Kek(generate_key(), "a key never added"))
    store.close()
    reopened = backend.open(kek)
    assert reopened.get("a") == (b"alpha", 1)
    reopened.close()


def test_a_store_with_values_but_no_data_key_is_not_given_a_new_one(
    backend: Backend, kek: Kek
) -> None:
    store = backend.open(kek)
    store.put("a", b"alpha")
    store.close()
    backend.raw("DELETE FROM data_keys", ())
    with pytest.raises(KekError, match="no data key"):
        backend.open(kek)
    assert backend.raw("SELECT COUNT(*) FROM data_keys", ()) == [(0,)]


def test_two_rotations_of_one_state_directory_do_not_run_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    monkeypatch.delenv("LEGERD_KEK", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    kek = load_kek(state / "keys" / "main.key")
    store = SecretStore(state / "secrets.db", kek)
    store.put("a", b"alpha")
    store.close()
    with rotation_lock(LegerdConfig(state_dir=state)):  # as a rotation in progress holds it
        result = CliRunner().invoke(legerd_cli, ["rotate-kek", "--state-dir", str(state)])
    assert result.exit_code == 1
    assert "another `legerd rotate-kek` is running" in result.output
    assert load_kek(state / "keys" / "main.key").key == kek.key
    result = CliRunner().invoke(legerd_cli, ["rotate-kek", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
