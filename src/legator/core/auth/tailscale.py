"""Tailscale identity: tailscaled's LocalAPI ``whois`` over its unix socket, shared by legerd
and the control plane (which signs ``leger`` in by it)."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import httpx

# Tailscale hands out addresses from these ranges only.
TAILNET_NETWORKS = (
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("fd7a:115c:a1e0::/48"),
)


class WhoIsError(Exception):
    """The peer could not be identified through tailscaled."""


def is_tailnet(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in TAILNET_NETWORKS)


def cache_key(addr: str) -> str:
    """What a whois answer for ``addr`` (``IP``, ``IP:PORT`` or ``[IP]:PORT``) holds for.

    tailscaled looks a node up by its address, whatever the port: one answer serves every
    connection from a tailnet address. Any other address keeps its port: tailscaled names
    the peer of a loopback connection it proxied (userspace networking, `tailscale serve`)
    by that connection's port, so one such address stands for many nodes.
    """
    host = addr if is_tailnet(addr) else addr.rpartition(":")[0].strip("[]")
    return str(ipaddress.ip_address(host)) if is_tailnet(host) else addr


def login_name(who: dict[str, Any]) -> str | None:
    """The user a whois answer names, or None for a tagged device (which acts for no user)."""
    node = who.get("Node") or {}
    if node.get("Tags"):
        return None
    name = (who.get("UserProfile") or {}).get("LoginName")
    return name if isinstance(name, str) and name else None


class WhoIs:
    """A client of tailscaled's LocalAPI on its unix socket, with a short cache per node
    (see ``cache_key``): a node asks once per ``ttl``, not once per connection or request.

    ``ttl`` bounds how long a changed identity goes unseen: grants or tags edited, or a node
    deleted and its address given to another node, which is taken for the old one until the
    answer asked before the change expires. An answer expires ``ttl`` after it was asked,
    however often it is used meanwhile.
    """

    def __init__(self, socket_path: Path, ttl: float = 5.0) -> None:
        self.socket_path = socket_path
        self._ttl = ttl
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://local-tailscaled.sock",
            timeout=5.0,
        )

    async def whois(self, addr: str) -> dict[str, Any]:
        now, key = time.monotonic(), cache_key(addr)
        hit = self._cache.get(key)
        if hit and hit[0] > now:
            return hit[1]
        try:
            response = await self._client.get("/localapi/v0/whois", params={"addr": addr})
        except httpx.HTTPError as exc:
            raise WhoIsError(f"tailscaled LocalAPI at {self.socket_path}: {exc}") from None
        if response.status_code != 200:
            raise WhoIsError(
                f"whois {addr}: LocalAPI answered {response.status_code} "
                f"{response.text.strip()[:200]}"
            )
        try:
            body = response.json()
        except ValueError:
            raise WhoIsError(f"whois {addr}: LocalAPI answered non-JSON") from None
        if not isinstance(body, dict):
            raise WhoIsError(f"whois {addr}: LocalAPI answered an unexpected shape")
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (now + self._ttl, body)
        return body

    async def aclose(self) -> None:
        await self._client.aclose()
