"""What we know about the client's connection (behind trusted proxies, uvicorn has already
rewritten the scope from X-Forwarded-*)."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from legator.core.http.protocol import PEER_EXTENSION


def client_ip(conn: HTTPConnection) -> str:
    """The client's address: from a trusted proxy's X-Forwarded-For where there is one."""
    return conn.client.host if conn.client else ""


def peer_ip(conn: HTTPConnection) -> str:
    """The address the connection comes from, whatever a proxy header says. A header from a
    trusted proxy's address can be sent by anyone who can connect from there (on loopback,
    every user of the host)."""
    peer = conn.scope.get("extensions", {}).get(PEER_EXTENSION)
    return str(peer[0]) if peer else client_ip(conn)


def is_https(conn: HTTPConnection) -> bool:
    return conn.url.scheme in ("https", "wss")


def is_local_path(target: str) -> bool:
    """Whether a redirect target stays on this site: an absolute path, never ``//host`` or
    ``/\\host`` (which browsers read as another site), a scheme, or control characters."""
    if not target.startswith("/") or len(target) > 2000:
        return False
    if target.startswith("//") or "\\" in target:
        return False
    return not any(ord(char) < 0x21 or ord(char) == 0x7F for char in target)
