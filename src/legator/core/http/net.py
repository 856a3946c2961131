"""What we know about the client's connection (behind trusted proxies, uvicorn has already
rewritten the scope from X-Forwarded-*)."""

from __future__ import annotations

from starlette.requests import HTTPConnection


def client_ip(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else ""


def is_https(conn: HTTPConnection) -> bool:
    return conn.url.scheme in ("https", "wss")
