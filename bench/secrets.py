"""legerd: get and put latency (p50/p99) and throughput over loopback HTTP and the unix
socket, against a real `legerd serve` process.

Latency is measured one request at a time with a keep-alive ``http.client`` connection (the
lightest client the standard library has, so the figure is the server's), and again with the
project's own ``Client`` (httpx). Throughput from many connections is measured with wrk.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import BIN, free_port, percentile, report, wrk
from legator.secrets.client import Client

GETS = 5000
PUTS = 300
WRK_SECONDS = 10
HEADERS = {"Content-Type": "application/json", "Sec-X-Tailscale-No-Browsers": "setec"}


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (the standard library has no such option)."""

    def __init__(self, path: str) -> None:
        super().__init__("legerd")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def call(conn: http.client.HTTPConnection, method: str, body: dict[str, Any]) -> bytes:
    conn.request("POST", f"/api/{method}", body=json.dumps(body), headers=HEADERS)
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{method}: HTTP {response.status} {data!r}")
    return data


def measure(n: int, op: Callable[[int], object]) -> dict[str, float]:
    for i in range(min(200, n)):  # warm up
        op(i)
    samples = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        op(i)
        samples.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
        "ops_s": n / elapsed,
    }


def main() -> None:
    state = Path(tempfile.mkdtemp(prefix="legerd-bench-"))
    port = free_port()
    sock = state / "legerd.sock"
    proc = subprocess.Popen(
        [
            str(BIN / "legerd"),
            "serve",
            "--dev",
            "--state-dir",
            str(state / "state"),
            "--listen",
            f"127.0.0.1:{port}",
            "--socket",
            str(sock),
        ],
        env={**os.environ, "LEGERD_KEK": ""},
    )
    rows: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        value = base64.b64encode(os.urandom(48)).decode()
        transports: dict[str, Callable[[], http.client.HTTPConnection]] = {
            "tcp": lambda: http.client.HTTPConnection("127.0.0.1", port),
            "unix": lambda: UnixHTTPConnection(str(sock)),
        }
        for transport, connect in transports.items():
            conn = connect()
            call(conn, "put", {"Name": "bench/get", "Value": value})
            get = measure(GETS, lambda _i, c=conn: call(c, "get", {"Name": "bench/get"}))
            rows.append({"case": "get (http.client)", "transport": transport, **get})
            put = measure(
                PUTS,
                lambda i, c=conn, t=transport: call(
                    c, "put", {"Name": f"bench/put/{t}/{i}", "Value": value}
                ),
            )
            rows.append({"case": "put (http.client)", "transport": transport, **put})
            conn.close()
        for transport, client in (
            ("tcp", Client(f"http://127.0.0.1:{port}")),
            ("unix", Client(socket_path=sock)),
        ):
            with client:
                get = measure(GETS, lambda _i, c=client: c.get("bench/get"))
                rows.append({"case": "get (legator Client)", "transport": transport, **get})
        script = state / "get.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.body = \'{"Name":"bench/get"}\'\n'
            + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in HEADERS.items())
        )
        for connections in (1, 16):
            result = wrk(
                f"http://127.0.0.1:{port}/api/get",
                connections=connections,
                duration_s=WRK_SECONDS,
                script=script,
            )
            rows.append(
                {
                    "case": f"get (wrk, {connections} conn)",
                    "transport": "tcp",
                    "p50_ms": result["p50_ms"],
                    "p99_ms": result["p99_ms"],
                    "ops_s": result["rps"],
                }
            )
            assert result["errors"] == 0, result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        shutil.rmtree(state, ignore_errors=True)
    report(
        "secrets",
        "legerd: setec get/put over loopback TCP and the unix socket (one legerd process)",
        rows,
        gets=GETS,
        puts=PUTS,
        wrk_seconds=WRK_SECONDS,
        target="get p50 < 1 ms; >= 3,000 gets/s from one process",
    )


if __name__ == "__main__":
    main()
