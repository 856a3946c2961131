"""The Python Client (TCP and unix socket) and the cached, polling Store."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from legator.secrets.cache import Store
from legator.secrets.client import Client, Unavailable
from legator.secrets.errors import InvalidRequest, SecretNotFound, VersionClaimed
from tests.secrets.conftest import LegerdThread, wait_for


@pytest.fixture
def client(dev_legerd: LegerdThread) -> Client:
    with Client(dev_legerd.url) as c:
        yield c


def test_client_calls_over_tcp_and_socket(dev_legerd: LegerdThread, client: Client) -> None:
    assert client.put("app/key", b"\x00\xffbinary") == 1
    assert client.get("app/key") == (b"\x00\xffbinary", 1)
    assert client.put("app/key", b"v2") == 2
    assert client.get_if_changed("app/key", 1) is None
    client.activate("app/key", 2)
    assert client.get_if_changed("app/key", 1) == (b"v2", 2)
    client.create_version("app/key", 10, b"v10")
    info = client.info("app/key")
    assert (info.versions, info.active_version) == ([1, 2, 10], 10)
    client.delete_version("app/key", 1)
    with Client(socket_path=dev_legerd.config.socket_path) as local:
        assert local.get("app/key", 2) == (b"v2", 2)
        assert [i.name for i in local.list()] == ["app/key"]
    with pytest.raises(VersionClaimed):
        client.create_version("app/key", 1, b"x")
    with pytest.raises(InvalidRequest):
        client.delete_version("app/key", 10)
    client.delete("app/key")
    with pytest.raises(SecretNotFound):
        client.get("app/key")


def test_client_errors(legerd: LegerdThread) -> None:
    with Client(legerd.url) as unidentified, pytest.raises(Exception, match="identify"):
        unidentified.list()
    with Client("http://127.0.0.1:9") as nowhere, pytest.raises(Unavailable):
        nowhere.list()
    with Client(socket_path=legerd.config.socket_path) as root:
        assert root.put("x", b"1") == 1


def test_store_polls_watches_and_caches(
    tmp_path: Path, dev_legerd: LegerdThread, client: Client
) -> None:
    client.put("svc/a", b"a1")
    client.put("svc/b", b"b1")
    cache = tmp_path / "cache" / "secrets.json"
    seen: list[tuple[str, bytes, int]] = []
    with Client(dev_legerd.url) as store_client:
        store = Store(store_client, ["svc/a", "svc/b"], cache_file=cache, poll_interval=0.05)
        with store:
            handle = store.secret("svc/a")
            assert handle() == b"a1" and handle.version == 1
            store.watch("svc/a", lambda *args: seen.append(args))
            assert cache.stat().st_mode & 0o777 == 0o600
            client.put("svc/a", b"a2")
            client.activate("svc/a", 2)
            wait_for(lambda: store.get("svc/a") == b"a2", timeout=10)
            wait_for(lambda: seen == [("svc/a", b"a2", 2)], timeout=10)
            with pytest.raises(SecretNotFound):
                store.secret("svc/undeclared")
        polls = [
            e for e in dev_legerd.audit_lines if e["action"] == "get" and e["secret"] == "svc/b"
        ]
        assert len(polls) >= 2  # polled, answered 304 (not re-sent) while unchanged
    # A secret deleted on the server is not served from the cache.
    client.delete("svc/b")
    with Client(dev_legerd.url) as c, pytest.raises(SecretNotFound):
        Store(c, ["svc/a", "svc/b"], cache_file=cache, poll_interval=0).start()
    # The server is gone: a new Store starts from the 0600 cache file.
    dev_legerd.__exit__(None, None, None)
    with Client(dev_legerd.url) as dead:
        offline = Store(dead, ["svc/a", "svc/b"], cache_file=cache, poll_interval=0).start()
        assert offline.get("svc/a") == b"a2" and offline.version("svc/b") == 1
        with pytest.raises(Unavailable):
            Store(dead, ["svc/c"], cache_file=cache, poll_interval=0).start()


def test_store_poll_jitter(dev_legerd: LegerdThread) -> None:
    with Client(dev_legerd.url) as c:
        store = Store(c, [], poll_interval=100, jitter=0.2)
        delays = {store.next_delay() for _ in range(200)}
    assert all(80 <= d <= 120 for d in delays) and len(delays) > 100
    with pytest.raises(ValueError):
        Store(c, [], jitter=1.5)


def test_store_lookup_is_single_flight(dev_legerd: LegerdThread, client: Client) -> None:
    client.put("svc/lazy", b"lazy")
    with Client(dev_legerd.url) as c:
        store = Store(c, [], poll_interval=0).start()
        barrier = threading.Barrier(8)
        results: list[bytes] = []

        def worker() -> None:
            barrier.wait()
            results.append(store.get("svc/lazy"))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [b"lazy"] * 8
    fetches = [e for e in dev_legerd.audit_lines if e["action"] == "get"]
    assert len(fetches) == 1
