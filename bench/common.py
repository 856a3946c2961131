"""What every benchmark shares: a real `legator serve` process, wrk, percentiles and the
report (a Rich table on the terminal plus bench/results/<name>.json)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
BIN = Path(sys.executable).parent
console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def report(name: str, title: str, rows: list[dict[str, Any]], **meta: Any) -> Path:
    """Print ``rows`` as a table and write them with ``meta`` to bench/results/<name>.json."""
    table = Table(title=title, title_justify="left")
    columns = list(rows[0]) if rows else []
    for column in columns:
        table.add_column(column, justify="left" if column in ("case", "target") else "right")
    for row in rows:
        table.add_row(*(f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps({"name": name, "machine": machine(), "meta": meta, "rows": rows}, indent=2)
    )
    console.print(f"[dim]written to {path}[/dim]")
    return path


@dataclass
class Server:
    """`legator serve` in its own process, with a fresh data dir and its admin key."""

    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    # False for a replica joining a database another one created: no first-start credentials.
    first_start: bool = True
    admin_key: str = ""
    proc: subprocess.Popen[str] | None = None
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="legator-bench-")))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        env = {
            **os.environ,
            "LEGATOR_DATA_DIR": str(self.data_dir),
            "LEGATOR_ADDR": f"127.0.0.1:{self.port}",
            **self.env,
        }
        self.proc = subprocess.Popen(
            [str(BIN / "legator"), "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if self.first_start else subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + 30
        if self.first_start:
            banner = ""
            assert self.proc.stderr is not None
            while "admin API key" not in banner and time.monotonic() < deadline:
                banner += self.proc.stderr.readline()
            match = re.search(r"admin API key:\s+(lgk_[0-9a-f]{64})", banner)
            if not match:
                raise RuntimeError(f"server did not print its admin key: {banner}")
            self.admin_key = match.group(1)
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    return float(match.group(1)) * _UNIT[match.group(2)]


def wrk(
    url: str,
    *,
    connections: int,
    duration_s: int = 10,
    headers: dict[str, str] | None = None,
    script: Path | None = None,
) -> dict[str, float]:
    """Drive ``url`` with wrk (a C load generator: a Python client would be the bottleneck on
    two cores). Returns requests/s, p50/p99 latency in ms and the error count."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make system-deps` (as root) first")
    command = [
        "wrk",
        "--latency",
        f"-t{min(connections, 2)}",
        f"-c{connections}",
        f"-d{duration_s}s",
    ]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    if script is not None:  # a Lua script, e.g. to send POST bodies
        command += ["-s", str(script)]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    latency = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(latency["50"]),
        "p99_ms": _ms(latency["99"]),
        "errors": float(errors + (int(non2xx.group(1)) if non2xx else 0)),
    }
