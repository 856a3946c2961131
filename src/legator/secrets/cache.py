"""``Store``: the secrets a program declares, kept fresh in memory and in a 0600 cache file.

Declared secrets are fetched at start (the cache file stands in when the server is down),
then polled with jitter using ``UpdateIfChanged`` so an unchanged secret costs a 304.
Watchers hear about new versions; lookups of undeclared secrets are single-flight (concurrent
callers share one request) and join the polled set.
"""

from __future__ import annotations

import base64
import json
import random
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from legator.core.security import write_private_file
from legator.secrets.client import Client, Unavailable
from legator.secrets.errors import SecretNotFound, SecretsError

Watcher = Callable[[str, bytes, int], None]


@dataclass(frozen=True)
class Cached:
    value: bytes
    version: int


class Secret:
    """A handle on one declared secret: call it for the current value."""

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self.name = name

    def __call__(self) -> bytes:
        return self._store.get(self.name)

    @property
    def version(self) -> int:
        return self._store.version(self.name)


class Store:
    def __init__(
        self,
        client: Client,
        secrets: Iterable[str],
        *,
        cache_file: Path | None = None,
        poll_interval: float = 60.0,
        jitter: float = 0.25,
    ) -> None:
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.client = client
        self.cache_file = cache_file
        self.poll_interval = poll_interval
        self.jitter = jitter
        self._declared = list(dict.fromkeys(secrets))
        self._values: dict[str, Cached] = {}
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[Cached]] = {}
        self._watchers: dict[str, list[Watcher]] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # life cycle

    def start(self) -> Store:
        cached = self._read_cache()
        for name in self._declared:
            try:
                value, version = self.client.get(name)
                self._values[name] = Cached(value, version)
            except Unavailable:
                # Only an unreachable server falls back to the cache: a denial or a deleted
                # secret must not be papered over with a stale copy.
                if name not in cached:
                    raise
                self._values[name] = cached[name]
        self._write_cache()
        if self.poll_interval > 0:
            self._poller = threading.Thread(
                target=self._poll_loop, name="secrets-poll", daemon=True
            )
            self._poller.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)

    def __enter__(self) -> Store:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # reading

    def secret(self, name: str) -> Secret:
        if name not in self._values:
            raise SecretNotFound(f"{name!r} was not declared; use lookup()")
        return Secret(self, name)

    def get(self, name: str) -> bytes:
        found = self._values.get(name)
        return found.value if found else self.lookup(name).value

    def version(self, name: str) -> int:
        found = self._values.get(name)
        return found.version if found else self.lookup(name).version

    def lookup(self, name: str) -> Cached:
        """Fetch an undeclared secret once, however many threads ask at the same time."""
        with self._lock:
            if name in self._values:
                return self._values[name]
            future = self._inflight.get(name)
            leader = future is None
            if leader:
                future = self._inflight[name] = Future()
        assert future is not None
        if not leader:
            return future.result()
        try:
            value, version = self.client.get(name)
            result = Cached(value, version)
            with self._lock:
                self._values[name] = result
            self._write_cache()
            future.set_result(result)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(name, None)
        return result

    def watch(self, name: str, callback: Watcher) -> Callable[[], None]:
        """Call ``callback(name, value, version)`` after each new version; returns an
        unsubscribe function."""
        with self._lock:
            self._watchers.setdefault(name, []).append(callback)

        def cancel() -> None:
            with self._lock:
                if callback in self._watchers.get(name, []):
                    self._watchers[name].remove(callback)

        return cancel

    # polling

    def next_delay(self) -> float:
        spread = self.poll_interval * self.jitter
        return self.poll_interval + random.uniform(-spread, spread)  # noqa: S311 - not crypto

    def poll_once(self) -> list[str]:
        """Ask for every known secret whether it changed; returns the names that did."""
        changed: list[str] = []
        for name, current in list(self._values.items()):
            try:
                update = self.client.get_if_changed(name, current.version)
            except SecretsError:
                continue  # keep serving the last value; the next poll retries
            if update is None:
                continue
            value, version = update
            self._values[name] = Cached(value, version)
            changed.append(name)
        if changed:
            self._write_cache()
            for name in changed:
                for callback in list(self._watchers.get(name, [])):
                    callback(name, self._values[name].value, self._values[name].version)
        return changed

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.next_delay()):
            self.poll_once()

    # cache file

    def _read_cache(self) -> dict[str, Cached]:
        if self.cache_file is None or not self.cache_file.exists():
            return {}
        try:
            raw = json.loads(self.cache_file.read_text())
            return {
                name: Cached(base64.b64decode(entry["Value"]), int(entry["Version"]))
                for name, entry in raw.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError):
            return {}  # a damaged cache is only a missed fallback, never a wrong value

    def _write_cache(self) -> None:
        if self.cache_file is None:
            return
        body = {
            name: {"Value": base64.b64encode(c.value).decode(), "Version": c.version}
            for name, c in sorted(self._values.items())
        }
        write_private_file(self.cache_file, json.dumps(body, indent=1) + "\n")
