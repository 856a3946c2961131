"""Route dependencies. Every route declares exactly one permission with ``require()``; a test
walks the app and fails on any route without one."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends
from starlette.requests import HTTPConnection

from legator.core.auth.permissions import Permission, Role, permissions_for_role
from legator.core.auth.principal import Principal
from legator.core.errors import Forbidden, Unauthorized
from legator.core.runtime import Core

SESSION_COOKIE = "legator_session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANONYMOUS = Principal(
    user_id=None, username="anonymous", role="", permissions=frozenset(), method="anonymous"
)
_AUTH_DISABLED = Principal(
    user_id=None,
    username="anonymous",
    role=Role.ADMIN.value,
    permissions=permissions_for_role(Role.ADMIN.value),
    method="anonymous",
)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="legator"'}


def core_of(conn: HTTPConnection) -> Core:
    return conn.app.state.core  # type: ignore[no-any-return]


def bearer_credential(conn: HTTPConnection) -> str | None:
    """The Bearer token of ``Authorization``, else ``x-api-key`` (Anthropic's clients): an
    Authorization of another scheme (a proxy's Basic) does not hide the key."""
    scheme, _, credential = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    return conn.headers.get("x-api-key") or None


def _host(conn: HTTPConnection) -> str:
    return conn.headers.get("x-forwarded-host") or conn.headers.get("host", "")


def _same_origin(conn: HTTPConnection) -> bool:
    """Cookie-authenticated writes must come from our own pages (CSRF defence in depth on top
    of SameSite=Lax)."""
    source = conn.headers.get("origin") or conn.headers.get("referer")
    if not source:
        return False
    return _netloc(source) == _host(conn)


def cross_site(conn: HTTPConnection) -> bool:
    """Whether a browser says the request comes from another site's page. Browsers send
    Origin on every cross-site POST; a client that sends neither header is not a browser."""
    source = conn.headers.get("origin") or conn.headers.get("referer")
    return bool(source) and _netloc(source) != _host(conn)


def _netloc(url: str) -> str | None:
    """The ``host[:port]`` of a URL; None for one that does not parse (an unclosed IPv6
    bracket), which then matches no server."""
    try:
        return urlsplit(url).netloc
    except ValueError:
        return None


def _named_by_address(conn: HTTPConnection) -> bool:
    """Whether the request names this server by a loopback name or an IP address, as a page
    that reached it by DNS rebinding (its own name resolving to 127.0.0.1) cannot. Every name
    the request gives must be one: such a page is same-origin with its own name, so it may add
    an X-Forwarded-Host of its choosing to its fetch(), but its Host is the browser's."""
    names = [conn.headers.get("host", "")]
    if "x-forwarded-host" in conn.headers:
        names.append(conn.headers["x-forwarded-host"])
    return all(_is_address(name) for name in names)


def _is_address(name: str) -> bool:
    try:
        host = urlsplit(f"//{name}").hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def authenticate(conn: HTTPConnection) -> Principal:
    cached = getattr(conn.state, "principal", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    core = core_of(conn)
    if not core.settings.auth:
        # Every caller is an admin, so any page the local user opens could act as one: refuse
        # other sites' requests, and names other than an address (DNS rebinding).
        if not _named_by_address(conn):
            raise Forbidden(
                "with LEGATOR_AUTH=false, reach this server as localhost or by its address"
            )
        if conn.scope.get("method", "GET") not in _SAFE_METHODS and cross_site(conn):
            raise Forbidden("cross-site request refused: Origin does not match this server")
        principal = _AUTH_DISABLED
    elif (credential := bearer_credential(conn)) is not None:
        found = await core.auth.authenticate_key(credential)
        if found is None:
            core.metrics.auth_failures.labels("bad_key").inc()
            raise Unauthorized("invalid, expired or revoked API key", headers=_CHALLENGE)
        principal = found
    elif token := conn.cookies.get(SESSION_COOKIE):
        found = await core.auth.authenticate_session(token)
        if found is None:
            core.metrics.auth_failures.labels("bad_session").inc()
            raise Unauthorized("your session has expired; sign in again", headers=_CHALLENGE)
        if conn.scope.get("method", "GET") not in _SAFE_METHODS and not _same_origin(conn):
            raise Forbidden("cross-site request refused: Origin does not match this server")
        principal = found
    else:
        core.metrics.auth_failures.labels("missing").inc()
        raise Unauthorized(
            "authentication required: send an API key or sign in", headers=_CHALLENGE
        )
    conn.state.principal = principal
    return principal


class Require:
    """The permission a route needs. ``Permission.PUBLIC`` routes skip authentication."""

    __slots__ = ("permission",)

    def __init__(self, permission: Permission) -> None:
        self.permission = permission

    async def __call__(self, conn: HTTPConnection) -> Principal:
        if self.permission is Permission.PUBLIC:
            return ANONYMOUS
        principal = await authenticate(conn)
        if not principal.can(self.permission):
            raise Forbidden(f"this needs the {self.permission.value!r} permission")
        return principal

    def __repr__(self) -> str:
        return f"Require({self.permission.value})"


def require(permission: Permission) -> Any:
    return Depends(Require(permission))
