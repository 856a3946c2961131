"""Which replica serves each model whose backend no replica runs itself (an external backend).

Each replica with a ``LEGATOR_REPLICA_URL`` says so on the cluster bus every ``BEAT_S``; a
model's home is the one of those alive whose hash with the model id is highest (rendezvous
hashing: every replica picks the same home from the same list, and a replica joining or leaving
moves only the models whose home it is or becomes). The others forward the model's requests to
its home, so the model has one set of slots, one queue and one fairness order in the cluster.
A replica without a URL, or cut off from the bus, serves everything itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass

from legator.core.cluster import ClusterLink
from legator.core.logging import get_logger

log = get_logger("legator.gateway.homes")
KIND = "gateway-replica"
BEAT_S = 5.0
# Three beats missed: the replica is gone (its URL would only get clients 503s).
EXPIRE_S = 3 * BEAT_S
_URL = re.compile(r"^https?://\S+$")


@dataclass(frozen=True, slots=True)
class Home:
    replica: str
    url: str


def _score(replica: str, model_id: str) -> int:
    digest = hashlib.sha256(f"{replica}\0{model_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class Homes:
    def __init__(self, link: ClusterLink, url: str | None) -> None:
        self.link = link
        self.url = url
        self._peers: dict[str, tuple[str, float]] = {}  # replica -> (URL, when last heard)
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

    async def run(self) -> None:
        """Say where this replica is, every ``BEAT_S``."""
        if self.url is None:
            return
        while True:
            self._beat()
            await asyncio.sleep(BEAT_S)

    def _beat(self) -> None:
        if self.url is not None:
            self.link.broadcast(KIND, {"url": self.url})

    def _heard(self, origin: str, body: dict[str, object]) -> None:
        if body.get("leaving") is True:
            self._peers.pop(origin, None)
            return
        url = body.get("url")
        if not isinstance(url, str) or len(url) > 512 or not _URL.match(url):
            log.warning("malformed replica address ignored", origin=origin)
            return
        joined = origin not in self._peers
        self._peers[origin] = (url, time.monotonic())
        if joined:
            log.info("replica serving models joined", replica=origin, url=url)
            self._beat()  # the newcomer learns of this replica now, not at its next beat

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
            self.link.broadcast(KIND, {"leaving": True})
