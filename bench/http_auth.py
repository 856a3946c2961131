"""The cost of authentication: GET /healthz (no auth) against an authenticated GET /api/v1/me
(API key looked up and checked on every request), at concurrency 1 and 64."""

from __future__ import annotations

import httpx

from bench.common import Server, report, wrk

DURATION_S = 10


def main() -> None:
    rows = []
    with Server() as server:
        auth = {"Authorization": f"Bearer {server.admin_key}"}
        assert httpx.get(server.url + "/api/v1/me", headers=auth).status_code == 200
        wrk(server.url + "/api/v1/me", connections=4, duration_s=2, headers=auth)  # warm up
        for path, headers in (("/healthz", None), ("/api/v1/me", auth)):
            for connections in (1, 64):
                result = wrk(
                    server.url + path,
                    connections=connections,
                    duration_s=DURATION_S,
                    headers=headers,
                )
                rows.append({"case": f"GET {path}", "concurrency": connections, **result})
    report(
        "http_auth",
        "HTTP: unauthenticated vs API-key-authenticated requests (one legator serve process)",
        rows,
        duration_s=DURATION_S,
        target="GET /api/v1/me p50 < 2 ms at concurrency 1",
    )


if __name__ == "__main__":
    main()
