"""legerd's storage quotas: versions kept per secret, secrets and bytes per writer, bytes in
all, configured from LEGERD_MAX_* and answered in setec's wire format. Each test failed
before the quotas existed (every put was accepted)."""

from __future__ import annotations

import base64
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from legator.secrets.client import Client
from legator.secrets.crypto import Kek, generate_key
from legator.secrets.errors import InvalidRequest
from legator.secrets.quota import Quota, QuotaExceeded
from legator.secrets.server import ConfigProblem, Legerd
from tests.secrets.conftest import (
    Backend,
    FakeTailscale,
    LegerdThread,
    make_config,
    whois_user,
)

ALL = ["get", "info", "put", "activate", "delete", "create-version"]
ALICE_IP, BOB_IP = "127.0.0.3", "127.0.0.4"
QUOTA_ENV = (
    "LEGERD_RATE_LIMIT",
    "LEGERD_RATE_BURST",
    "LEGERD_MAX_VERSIONS_PER_SECRET",
    "LEGERD_MAX_SECRETS_PER_WRITER",
    "LEGERD_MAX_BYTES_PER_WRITER",
    "LEGERD_MAX_TOTAL_BYTES",
)


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def put(client: httpx.Client, name: str, value: bytes) -> httpx.Response:
    return client.post("/api/put", json={"Name": name, "Value": b64(value)})


def assert_over_quota(response: httpx.Response, *fragments: str) -> None:
    """setec's shape for a refusal its client reports verbatim: a plain-text line with a
    status none of its typed errors (403, 404, 412) claims."""
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text.startswith("quota exceeded: ") and response.text.endswith("\n")
    for fragment in fragments:
        assert fragment in response.text, response.text


@pytest.fixture
def start(
    tmp_path: Path,
    shared_dir: Path,
    tailscale: FakeTailscale,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[object]:
    """Start legerd with the given LEGERD_MAX_* settings; alice and bob may do anything."""
    for key in QUOTA_ENV:
        monkeypatch.delenv(key, raising=False)
    for ip, login in ((ALICE_IP, "alice@example.com"), (BOB_IP, "bob@example.com")):
        tailscale.identities[ip] = whois_user(login, [{"action": ALL, "secret": ["*"]}])
    running: list[LegerdThread] = []

    def starter(**env: str) -> LegerdThread:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        daemon = LegerdThread(make_config(tmp_path / "state", shared_dir, tailscale))
        running.append(daemon.__enter__())
        return daemon

    yield starter
    for daemon in running:
        daemon.__exit__(None, None, None)


def test_default_limits_stop_a_writer_adding_versions_without_end(start) -> None:  # type: ignore[no-untyped-def]
    """Before: every one of thousands of puts to one secret was kept (setec keeps every
    version too). Now the default keeps 1000 live versions and refuses the next put."""
    legerd = start(LEGERD_RATE_LIMIT="0")
    with legerd.tcp(ALICE_IP) as alice:
        for n in range(1, 1001):
            response = put(alice, "app/token", str(n).encode())
            assert response.status_code == 200, (n, response.text)
            assert response.json() == n
        assert_over_quota(put(alice, "app/token", b"1001"), "'app/token'", "1000 versions")
        # A put of the latest value stores nothing, so the cap does not refuse it.
        assert put(alice, "app/token", b"1000").json() == 1000
        assert len(alice.post("/api/info", json={"Name": "app/token"}).json()["Versions"]) == 1000


def test_versions_per_secret_count_live_versions(start) -> None:  # type: ignore[no-untyped-def]
    legerd = start(LEGERD_MAX_VERSIONS_PER_SECRET="3")
    with legerd.tcp(ALICE_IP) as alice:
        assert [put(alice, "app/key", v).json() for v in (b"a", b"b", b"c")] == [1, 2, 3]
        assert_over_quota(
            put(alice, "app/key", b"d"), "'app/key' keeps 3 versions", "delete-version"
        )
        created = alice.post(
            "/api/create-version", json={"Name": "app/key", "Version": 9, "Value": b64(b"z")}
        )
        assert_over_quota(created, "'app/key'")
        assert (
            alice.post("/api/delete-version", json={"Name": "app/key", "Version": 2}).json() == {}
        )
        assert put(alice, "app/key", b"d").json() == 4  # numbers are never reused
        assert alice.post("/api/info", json={"Name": "app/key"}).json()["Versions"] == [1, 3, 4]
    over = [line for line in legerd.audit_lines if line["outcome"] == "over-quota"]
    assert [(line["action"], line["secret"]) for line in over] == [
        ("put", "app/key"),
        ("create-version", "app/key"),
    ]
    assert all(line["authorized"] for line in over)


def test_secrets_per_writer(start) -> None:  # type: ignore[no-untyped-def]
    legerd = start(LEGERD_MAX_SECRETS_PER_WRITER="5")
    with legerd.tcp(ALICE_IP) as alice, legerd.tcp(BOB_IP) as bob:
        for n in range(5):
            assert put(alice, f"alice/{n}", b"v").status_code == 200
        assert_over_quota(
            put(alice, "alice/5", b"v"), "alice@example.com", "created 5 secrets", "alice/5"
        )
        created = alice.post(
            "/api/create-version", json={"Name": "alice/5", "Version": 3, "Value": b64(b"v")}
        )
        assert_over_quota(created, "alice@example.com")
        assert put(alice, "alice/0", b"v2").json() == 2  # a new version of one of hers
        assert put(bob, "bob/0", b"v").status_code == 200  # each writer has a quota
        assert put(bob, "alice/0", b"v3").json() == 3  # a version, not a secret, of bob's
        assert bob.post("/api/delete", json={"Name": "alice/4"}).json() == {}
        assert put(alice, "alice/5", b"v").status_code == 200  # freed, whoever deleted it


def test_bytes_per_writer_and_in_all(start) -> None:  # type: ignore[no-untyped-def]
    legerd = start(LEGERD_MAX_BYTES_PER_WRITER="10000", LEGERD_MAX_TOTAL_BYTES="15000")
    kib = b"x" * 1024
    with legerd.tcp(ALICE_IP) as alice, legerd.tcp(BOB_IP) as bob:
        responses = [put(alice, f"a/{n}", kib) for n in range(10)]
        # 9 KiB and their overhead fit in 10000 bytes, 10 do not.
        assert [r.status_code for r in responses] == [200] * 9 + [400]
        assert_over_quota(responses[-1], "alice@example.com", "10000 bytes")
        responses = [put(bob, f"b/{n}", kib) for n in range(6)]
        # Bob is stopped by the total (9 + 5 KiB), not by his own quota.
        assert [r.status_code for r in responses] == [200] * 5 + [400]
        assert_over_quota(responses[-1], "15000 bytes", "all secrets")
        # Deleting frees the space again.
        for n in range(3):
            assert alice.post("/api/delete", json={"Name": f"a/{n}"}).json() == {}
        assert put(bob, "b/again", kib).status_code == 200


def test_deleted_versions_still_count_their_names(start) -> None:  # type: ignore[no-untyped-def]
    """A deleted version stays claimed (its row is kept so its number is never reused), so
    put-and-delete-version in a loop would grow the database with no live value to count."""
    legerd = start(LEGERD_MAX_BYTES_PER_WRITER="20000")
    name = "churn/" + "n" * 400
    with legerd.tcp(ALICE_IP) as alice:
        refused = None
        for n in range(1, 200):
            response = put(alice, name, str(n).encode())
            if response.status_code != 200:
                refused = response
                break
            if n > 1:
                alice.post("/api/activate", json={"Name": name, "Version": n})
                alice.post("/api/delete-version", json={"Name": name, "Version": n - 1})
        assert refused is not None, "199 versions put and deleted, none refused"
        assert_over_quota(refused, "20000 bytes")
        assert alice.post("/api/delete", json={"Name": name}).json() == {}
        assert put(alice, name, b"fresh").json() == 1


def test_python_client_and_root_are_held_too(start) -> None:  # type: ignore[no-untyped-def]
    legerd = start(LEGERD_MAX_VERSIONS_PER_SECRET="1")
    with Client(socket_path=legerd.config.socket_path) as client:
        assert client.put("leger/root/x", b"one") == 1
        with pytest.raises(InvalidRequest, match=r"put: quota exceeded: .*\(HTTP 400\)"):
            client.put("leger/root/x", b"two")


@pytest.mark.parametrize("value", ["-1", "lots", "1.5", ""])
def test_a_bad_setting_stops_start(
    tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LEGERD_MAX_BYTES_PER_WRITER", value)
    with pytest.raises(ConfigProblem, match="LEGERD_MAX_BYTES_PER_WRITER"):
        Legerd(make_config(tmp_path / "s", shared_dir, None))


def test_a_store_from_before_quotas_gets_its_writer_column(backend: Backend) -> None:
    """An older store (SQLite file or PostgreSQL schema) has no ``writer`` column: it is
    added on open, and versions put before count for no writer."""
    kek = Kek(generate_key(), "test")
    store = backend.open(kek)
    store.put("old/a", b"v")
    store.close()
    backend.raw("DROP TABLE writer_usage", ())
    backend.raw("ALTER TABLE versions DROP COLUMN writer", ())
    backend.raw("ALTER TABLE secrets DROP COLUMN creator", ())
    store = backend.open(kek)
    one_each = Quota(
        max_versions_per_secret=0,
        max_secrets_per_writer=1,
        max_bytes_per_writer=0,
        max_total_bytes=0,
    )
    try:
        assert store.put("old/b", b"v", writer="alice", quota=one_each) == 1
        with pytest.raises(QuotaExceeded, match="alice already created 1 secrets"):
            store.put("old/c", b"w", writer="alice", quota=one_each)
        assert store.put("old/a", b"w", writer="alice", quota=one_each) == 2
    finally:
        store.close()
    rows = backend.raw("SELECT name, version, writer FROM versions ORDER BY name, version", ())
    assert [tuple(row) for row in rows] == [
        ("old/a", 1, None),
        ("old/a", 2, "alice"),
        ("old/b", 1, "alice"),
    ]


def _recounted(backend: Backend) -> list[tuple[str, int, int]]:
    """``writer_usage`` as counting the rows afresh gives it."""
    weights = dict(
        backend.raw(
            "SELECT COALESCE(writer, ''), SUM(LENGTH(name) + COALESCE(LENGTH(sealed), 0)) "
            "FROM versions GROUP BY COALESCE(writer, '')",
            (),
        )
    )
    created = dict(
        backend.raw(
            "SELECT COALESCE(creator, ''), COUNT(*) FROM secrets GROUP BY COALESCE(creator, '')",
            (),
        )
    )
    return sorted((w, int(weights.get(w, 0)), int(created.get(w, 0))) for w in {*weights, *created})


def _counted(backend: Backend) -> list[tuple[str, int, int]]:
    """``writer_usage`` as kept, writers with nothing left dropped."""
    rows = backend.raw("SELECT writer, bytes, secrets FROM writer_usage", ())
    return sorted((w, int(b), int(n)) for w, b, n in rows if b or n)


def test_usage_counters_follow_every_change(backend: Backend) -> None:
    """The quotas read counters, not the rows (a scan per write, inside the one writer
    transaction, would stall every writer behind the biggest one's rows); every change keeps
    them equal to the rows."""
    kek = Kek(generate_key(), "test")
    unlimited = Quota(0, 0, 0, 0)
    store = backend.open(kek)
    try:
        store.put("s/no-writer", b"old")  # a tool on the store: counted under ''
        store.put("s/a", b"1", writer="alice", quota=unlimited)
        store.put("s/a", b"22", writer="bob", quota=unlimited)
        store.put("s/a", b"22", writer="bob", quota=unlimited)  # unchanged: nothing stored
        store.create_version("s/b", 5, b"x" * 300, writer="bob", quota=unlimited)
        store.create_version("s/b", 2, b"y", writer="alice", quota=unlimited)
        store.put("s/c", b"zz", writer="alice", quota=unlimited)
        assert _counted(backend) == _recounted(backend)
        assert {w for w, _, _ in _counted(backend)} == {"", "alice", "bob"}
        store.delete_version("s/b", 5)  # 2 is active: create-version activates
        assert _counted(backend) == _recounted(backend)
        store.delete("s/a")
        store.delete("s/none")
        assert _counted(backend) == _recounted(backend)
    finally:
        store.close()


# Request rate: every call, a denied one included, costs an audit line (about 190 bytes
# written, never rotated by legerd), so a caller hammering any call filled the disk.
# (``--dev``, loopback only, has no limit unless one is set.)


def _audit_size(legerd: LegerdThread) -> int:
    return legerd.config.audit_path.stat().st_size


def test_a_caller_hammering_get_is_slowed_before_it_fills_the_audit_log(  # type: ignore[no-untyped-def]
    start, tailscale: FakeTailscale
) -> None:
    """Before: 1500 gets from a node with no grants at all were 1500 403s and 1500 audit
    lines, as fast as legerd answers (about 1200 a second here: 19 GB of audit a day). Now
    each source gets a burst of 1000 calls, then 50 a second, by default."""
    tailscale.identities["127.0.0.5"] = whois_user("mallory@example.com", [])
    legerd = start()
    before = _audit_size(legerd)
    with legerd.tcp("127.0.0.5") as mallory:
        statuses = [
            mallory.post("/api/get", json={"Name": "app/key"}).status_code for _ in range(1500)
        ]
        refused = mallory.post("/api/info", json={"Name": "app/key"})
    assert set(statuses) == {403, 429}
    assert 1000 <= statuses.count(403) < 1300, statuses.count(403)
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "text/plain; charset=utf-8"
    assert refused.text.startswith("rate limit exceeded: at most 50 calls a second")
    assert int(refused.headers["retry-after"]) >= 1
    assert _audit_size(legerd) - before < 1300 * 200
    with legerd.tcp(ALICE_IP) as alice:  # another source is not slowed
        assert put(alice, "app/key", b"v").status_code == 200
        metrics = alice.get("/metrics", headers={}).text
    refusals = statuses.count(429)
    assert f'legerd_api_calls_total{{call="get",status="429"}} {refusals}.0' in metrics


def test_rate_limit_settings_and_sources(start) -> None:  # type: ignore[no-untyped-def]
    legerd = start(LEGERD_RATE_LIMIT="2", LEGERD_RATE_BURST="5")
    with legerd.tcp(ALICE_IP) as alice, legerd.tcp(BOB_IP) as bob, legerd.unix() as local:
        assert [put(alice, "a/k", b"v").status_code for _ in range(6)] == [200] * 5 + [429]
        assert alice.get("/", headers={}).status_code == 429  # the index lists every secret
        assert [put(bob, "b/k", b"v").status_code for _ in range(5)] == [200] * 5
        assert local.post("/api/list", json={}).status_code == 200  # by uid, not address
        time.sleep(0.6)  # one token back at 2 a second
        assert put(alice, "a/k", b"v").status_code == 200
        assert put(alice, "a/k", b"v").status_code == 429


def test_python_client_waits_out_a_short_throttle(start) -> None:  # type: ignore[no-untyped-def]
    """``leger secrets sync`` of more secrets than the burst must not fail half-way: the
    client waits as long as Retry-After says, when that is short."""
    legerd = start(LEGERD_RATE_LIMIT="2", LEGERD_RATE_BURST="1")
    with Client(socket_path=legerd.config.socket_path) as client:
        started = time.monotonic()
        assert [client.put(f"leger/root/{n}", b"v") for n in range(3)] == [1, 1, 1]
        assert time.monotonic() - started >= 1.5  # two waits of Retry-After: 1


def test_dev_mode_has_no_rate_limit_unless_set(tmp_path: Path, shared_dir: Path) -> None:
    """The benchmarks drive ``legerd serve --dev`` far past any per-source limit."""
    config = make_config(tmp_path / "s", shared_dir, None, dev=True)
    with LegerdThread(config) as legerd, legerd.tcp() as local:
        statuses = {local.post("/api/list", json={}).status_code for _ in range(1100)}
    assert statuses == {200}


def test_rate_limit_off(start) -> None:  # type: ignore[no-untyped-def]
    legerd = start(LEGERD_RATE_LIMIT="0", LEGERD_RATE_BURST="1")
    with legerd.tcp(ALICE_IP) as alice:
        assert {put(alice, "a/k", b"v").status_code for _ in range(20)} == {200}


@pytest.mark.parametrize(
    ("key", "value"),
    [("LEGERD_RATE_LIMIT", "-2"), ("LEGERD_RATE_LIMIT", "fast"), ("LEGERD_RATE_BURST", "0")],
)
def test_a_bad_rate_setting_stops_start(
    tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: str
) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigProblem, match=key):
        Legerd(make_config(tmp_path / "s", shared_dir, None))


def test_a_caller_listing_again_and_again_does_not_hold_up_gets(start) -> None:  # type: ignore[no-untyped-def]
    """A list reads and filters every secret: 150 ms for 10,000 (what one writer's quota
    allows). It ran on the event loop, so while one caller listed in a loop every other
    caller's get waited for it: 300 ms instead of 1 ms. It now runs in a worker thread."""
    legerd = start(LEGERD_RATE_LIMIT="0")
    with legerd.tcp(ALICE_IP) as alice:
        assert put(alice, "x/key", b"v").status_code == 200
    sealed = legerd.legerd.service.store._sealer.seal("x", 1, b"v")
    with sqlite3.connect(legerd.config.db_path) as db:  # faster than 10,000 puts
        db.executemany(
            "INSERT INTO secrets (name, active, latest) VALUES (?, 1, 1)",
            [(f"app/{n}",) for n in range(10_000)],
        )
        db.executemany(
            "INSERT INTO versions (name, version, sealed) VALUES (?, 1, ?)",
            [(f"app/{n}", sealed) for n in range(10_000)],
        )

    def timed(client: httpx.Client, call: str, body: dict[str, str]) -> float:
        started = time.perf_counter()
        # A stalled machine may hold one call past httpx's 5 s default: what is compared
        # is medians, not single calls.
        assert client.post(f"/api/{call}", json=body, timeout=60).status_code == 200
        return time.perf_counter() - started

    with legerd.tcp(BOB_IP) as bob:
        one_list = statistics.median(timed(bob, "list", {}) for _ in range(5))
    stop = threading.Event()

    def list_again_and_again() -> None:
        with legerd.tcp(ALICE_IP) as alice:
            while not stop.is_set():
                alice.post("/api/list", json={})

    listers = [threading.Thread(target=list_again_and_again) for _ in range(2)]
    for lister in listers:
        lister.start()
    try:
        time.sleep(0.3)
        with legerd.tcp(BOB_IP) as bob:
            get = statistics.median(timed(bob, "get", {"Name": "x/key"}) for _ in range(20))
    finally:
        stop.set()
        for lister in listers:
            lister.join()
    assert get < one_list / 3, (get, one_list)
