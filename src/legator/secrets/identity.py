"""Who is calling: Tailscale identity for TCP peers (LocalAPI ``whois``), the peer's uid for
callers on legerd's unix socket (``SO_PEERCRED``), everyone-is-trusted in ``--dev`` mode."""

from __future__ import annotations

import ipaddress
import pwd
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from legator.core.auth.tailscale import WhoIsError
from legator.secrets.acl import ALL_ACTIONS, ALLOW_ALL, AclError, Action, Policy, Rule, parse_grant

# setec reads its grants from this capability (older tailnets prefix it with https://).
CAP_SECRETS = "tailscale.com/cap/secrets"
_CAP_NAMES = (CAP_SECRETS, "https://" + CAP_SECRETS)


# The caller could not be identified (setec answers 500 "unable to identify caller").
IdentityError = WhoIsError


@dataclass(frozen=True)
class Caller:
    principal: str  # what the audit log records
    principals: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    transport: str = "tailscale"

    def can(self, action: Action, name: str) -> bool:
        return any(rule.allows(action, name) for rule in self.rules)


DEV_CALLER = Caller("dev:local", ("dev:local",), (ALLOW_ALL,), "dev")


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> PeerCred | None:
    """The credentials of the process at the other end of a unix socket, else None."""
    try:
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def unix_caller(cred: PeerCred, policy: Policy) -> Caller:
    """A local user: rules from the policy file for ``unix:<name>``/``uid:<n>``, plus full
    control of its own namespace ``leger/<name>/*``. Root may do anything: it can read the
    key and the database anyway."""
    try:
        username = pwd.getpwuid(cred.uid).pw_name
    except KeyError:
        username = str(cred.uid)
    principals = (f"unix:{username}", f"uid:{cred.uid}")
    if cred.uid == 0:
        return Caller(f"unix:{username}", principals, (ALLOW_ALL,), "unix")
    # Escaped, not a pattern: a '*' in a user name must not widen the namespace.
    own = Rule(ALL_ACTIONS, (re.compile(r"\A" + re.escape(f"leger/{username}/") + r".*\Z"),))
    return Caller(f"unix:{username}", principals, (own, *policy.rules_for(principals)), "unix")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


OWN_ADDRESSES_TTL_S = 10.0
_own: tuple[float, frozenset[str]] = (0.0, frozenset())


def own_addresses() -> frozenset[str]:
    """The addresses of this host's interfaces (its tailnet ones included), re-read every
    OWN_ADDRESSES_TTL_S."""
    global _own
    read_at, addresses = _own
    if time.monotonic() - read_at > OWN_ADDRESSES_TTL_S:
        addresses = frozenset(
            unmapped(a.address.split("%", 1)[0])
            for nic in psutil.net_if_addrs().values()
            for a in nic
            if a.family in (socket.AF_INET, socket.AF_INET6)
        )
        _own = (time.monotonic(), addresses)
    return addresses


def from_this_host(host: str, local: str | None) -> bool:
    """Whether a TCP caller at ``host`` runs on legerd's own host (``local``: the address it
    reached). tailscaled names the host's node for its own tailnet address, so every local
    user would get the host's grants; they use the unix socket, identified by uid."""
    return host == local or host in own_addresses()


def unmapped(host: str) -> str:
    """The peer's address as tailscaled knows it: an IPv4 caller of a dual-stack (``[::]``)
    listener arrives as ``::ffff:a.b.c.d``, which whois does not match."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped) if mapped is not None else host


def caller_from_whois(who: dict[str, Any], policy: Policy) -> Caller:
    """Turn a LocalAPI ``/localapi/v0/whois`` answer into a caller, as setec does: a tagged
    node is its tags, otherwise the user's login name."""
    node = who.get("Node") or {}
    profile = who.get("UserProfile") or {}
    tags = [t for t in node.get("Tags") or [] if isinstance(t, str)]
    login = profile.get("LoginName") or ""
    if tags:
        principals: tuple[str, ...] = tuple(tags)
        display = ",".join(tags)
    elif login:
        principals = (login,)
        display = login
    else:
        raise IdentityError("whois answer names neither a user nor tags")
    rules: list[Rule] = []
    cap_map = who.get("CapMap") or {}
    for cap in _CAP_NAMES:
        for index, grant in enumerate(cap_map.get(cap) or []):
            try:
                where = f"capability {cap} grant {index}"
                rules.append(parse_grant(grant, where, ignore_unknown=True))
            except (AclError, ValueError) as exc:
                raise IdentityError(str(exc)) from None
    rules.extend(policy.rules_for(principals))
    host = node.get("Name") or ""
    return Caller(display, principals, tuple(rules), f"tailscale:{host}".rstrip(":"))
