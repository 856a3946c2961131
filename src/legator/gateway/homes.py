"""Which replica serves each model whose backend no replica runs itself (an external backend).

Each replica with a ``LEGATOR_REPLICA_URL`` says so on the cluster bus every ``BEAT_S``; a
model's home is the one of those alive whose hash with the model id is highest (rendezvous
hashing: every replica picks the same home from the same list, and a replica joining or leaving
moves only the models whose home it is or becomes). The others forward the model's requests to
its home, so the model has one set of slots, one queue and one fairness order in the cluster.
A replica without a URL, or cut off from the bus, serves everything itself; so does one whose
peer's URL does not answer from here (checked before anything is sent there, and again after a
forwarded request found nobody).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from legator.core.cluster import ClusterLink
from legator.core.logging import get_logger

log = get_logger("legator.gateway.homes")
KIND = "gateway-replica"
BEAT_S = 5.0
# Three beats missed: the replica is gone (its URL would only get clients 503s).
EXPIRE_S = 3 * BEAT_S
# A replica whose URL did not answer is tried again after this long.
RECHECK_S = 30.0
# Whether a replica's URL answers from here.
Reachable = Callable[[str], Awaitable[bool]]
_URL = re.compile(r"^https?://\S+\Z")


@dataclass(frozen=True, slots=True)
class Home:
    replica: str
    url: str


def _score(replica: str, model_id: str) -> int:
    digest = hashlib.sha256(f"{replica}\0{model_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class Homes:
    def __init__(
        self, link: ClusterLink, url: str | None, reachable: Reachable | None = None
    ) -> None:
        self.link = link
        self.url = url
        self._reachable = reachable
        self._peers: dict[str, tuple[str, float]] = {}  # replica -> (URL, when last heard)
        # Replicas whose URL this one could not reach, and until when it does not try again:
        # their models are served here meanwhile, rather than clients getting errors.
        self._unreachable: dict[str, tuple[str, float]] = {}
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._left = False  # said it is leaving: stopping, so no more beats
        link.on_broadcast(KIND, self._heard)
        link.on_state(self._on_state)

    def home_of(self, model_id: str) -> Home | None:
        """The replica that serves ``model_id``: None when it is this one."""
        if self.url is None or not self._peers or not self.link.connected:
            return None
        cutoff = time.monotonic() - EXPIRE_S
        best, home = _score(self.link.replica_id, model_id), None
        for replica, (url, heard) in self._peers.items():
            if heard >= cutoff and (score := _score(replica, model_id)) > best:
                best, home = score, Home(replica, url)
        return home

    def unreachable(self, replica: str) -> None:
        """A request forwarded to ``replica`` found nobody at its URL: its models are served
        here until ``RECHECK_S`` has passed and its URL answers again."""
        known = self._peers.pop(replica, None)
        if known is not None:
            log.warning(
                "a replica's URL stopped answering: serving its models here",
                replica=replica,
                url=known[0],
                retry_after_s=RECHECK_S,
            )
            self._unreachable[replica] = (known[0], time.monotonic() + RECHECK_S)

    async def run(self) -> None:
        """Say where this replica is, every ``BEAT_S``."""
        if self.url is None:
            return
        while True:
            self._beat()
            await asyncio.sleep(BEAT_S)

    def _beat(self) -> None:
        # Not after leave(): the beat task may still run while the replica stops (its
        # backends take seconds), and the others would send it requests again.
        if self.url is not None and not self._left:
            self.link.broadcast(KIND, {"url": self.url})

    def _heard(self, origin: str, body: dict[str, object]) -> None:
        if body.get("leaving") is True:
            self._peers.pop(origin, None)
            self._unreachable.pop(origin, None)
            check = self._checks.pop(origin, None)
            if check is not None:  # its answer, from before it left, must not make it a home
                check.cancel()
            return
        url = body.get("url")
        if not isinstance(url, str) or len(url) > 512 or not _URL.match(url):
            log.warning("malformed replica address ignored", origin=origin)
            return
        now = time.monotonic()
        known = self._peers.get(origin)
        if known is not None and known[0] == url:
            self._peers[origin] = (url, now)
            return
        if origin in self._checks:
            return
        failed = self._unreachable.get(origin)
        if failed is None and known is None:
            self._beat()  # a newcomer learns of this replica now, not at its next beat
        if failed is not None and failed[0] == url and failed[1] > now:
            return
        if self._reachable is None:
            self._join(origin, url)
            return
        # Nothing goes to a URL before it has answered from here (a wrong
        # LEGATOR_REPLICA_URL would otherwise fail every request for the models homed there).
        self._checks[origin] = asyncio.ensure_future(self._check(origin, url, self._reachable))

    async def _check(self, origin: str, url: str, reachable: Reachable) -> None:
        try:
            answered = await reachable(url)
        except Exception:
            answered = False
        finally:
            if self._checks.get(origin) is asyncio.current_task():  # not a newer check's
                del self._checks[origin]
        if answered:
            self._join(origin, url)
            return
        self._peers.pop(origin, None)
        self._unreachable[origin] = (url, time.monotonic() + RECHECK_S)
        log.warning(
            "a replica announces a URL this one cannot reach: serving its models here",
            replica=origin,
            url=url,
            retry_after_s=RECHECK_S,
        )

    def _join(self, origin: str, url: str) -> None:
        self._unreachable.pop(origin, None)
        self._peers[origin] = (url, time.monotonic())
        log.info("replica serving models joined", replica=origin, url=url)

    def _on_state(self, up: bool) -> None:
        if up:
            self._beat()  # at once: the others may have let this replica expire meanwhile
        else:
            # Cut off: the others' beats no longer arrive, and they may be gone.
            self._peers.clear()

    def leave(self) -> None:
        """Shutting down: the others stop sending this replica requests now, not in
        ``EXPIRE_S``."""
        if self.url is not None:
            self._left = True
            self.link.broadcast(KIND, {"leaving": True})

    async def close(self) -> None:
        for task in list(self._checks.values()):
            task.cancel()
        await asyncio.gather(*self._checks.values(), return_exceptions=True)
