"""What forwarding costs: two replicas (one PostgreSQL, joined by NATS, each with its
``LEGATOR_REPLICA_URL``) in front of the fast local upstream of ``bench gateway``. A model is
served by its home replica; a request through the other one is forwarded there. Measured with
wrk, one case after another: non-streaming latency at concurrency 1 and 64, and 32-chunk
streams at concurrency 64, through the home and through the other replica.

Needs the machine's PostgreSQL (``BENCH_PG_ADMIN``, default
``postgresql://postgres@127.0.0.1:5432/postgres``) and NATS (``BENCH_NATS_URL``, default
``nats://127.0.0.1:4222``).

Run: ``.venv/bin/python -m bench gateway_replicas``
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from contextlib import ExitStack
from typing import Any

import asyncpg
import httpx

from bench.common import Server, free_port, report
from bench.gateway import PROMPT, process, serve_command, setup_gateway, wrk_post

SECONDS = 8
CHUNKS = 32
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")


async def _database(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _forwarded(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("legator_gateway_forwarded_requests_total{")
    )


def main() -> None:
    name = "legator_bench_" + secrets.token_hex(4)
    asyncio.run(_database(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN.rsplit("/", 1)[0]
    shared = {
        "LEGATOR_DATABASE_URL": f"{base}/{name}",
        "LEGATOR_SIGNING_KEY": secrets.token_hex(32),
        "LEGATOR_SECRETS_KEK": secrets.token_hex(32),
        "LEGATOR_NATS_URL": NATS_URL,
        "LEGATOR_NATS_SUBJECT_PREFIX": "bench-" + secrets.token_hex(4),
        "LEGATOR_LOG_LEVEL": "warning",
        "LEGATOR_METRICS_PUBLIC": "true",
    }
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    try:
        with ExitStack() as stack:
            stack.enter_context(process(serve_command("upstream_app", up_port), upstream + "/"))
            ports = free_port(), free_port()
            first, second = (
                Server(
                    port=port,
                    first_start=index == 0,
                    env={
                        **shared,
                        "LEGATOR_REPLICA_ID": f"replica-{index}",
                        "LEGATOR_REPLICA_URL": f"http://127.0.0.1:{port}",
                    },
                )
                for index, port in enumerate(ports)
            )
            stack.enter_context(first)
            stack.enter_context(second)
            key, _light = setup_gateway(first, upstream)
            body = {**PROMPT, "model": "bench", "max_tokens": CHUNKS}
            deadline = time.monotonic() + 30
            with httpx.Client(headers={"Authorization": f"Bearer {key}"}) as client:
                while time.monotonic() < deadline:
                    answer = client.post(second.url + "/v1/chat/completions", json=body)
                    if answer.status_code == 200:
                        break
                    time.sleep(0.2)
                time.sleep(1)  # both replicas have heard each other's beat by now
                client.post(first.url + "/v1/chat/completions", json=body).raise_for_status()
            home, other = (second, first) if _forwarded(first) else (first, second)
            path = "/v1/chat/completions"
            rows: list[dict[str, Any]] = []
            for label, payload, connections in (
                ("non-streaming, concurrency 1", body, 1),
                ("non-streaming, concurrency 64", body, 64),
                (f"{CHUNKS}-chunk streams, concurrency 64", {**body, "stream": True}, 64),
            ):
                local = wrk_post(
                    home.url + path, payload, connections=connections, duration_s=SECONDS, key=key
                )
                forwarded = wrk_post(
                    other.url + path, payload, connections=connections, duration_s=SECONDS, key=key
                )
                rows.append(
                    {
                        "case": label,
                        "home_rps": local["rps"],
                        "forwarded_rps": forwarded["rps"],
                        "home_p50_ms": local["p50_ms"],
                        "forwarded_p50_ms": forwarded["p50_ms"],
                        "added_p50_ms": forwarded["p50_ms"] - local["p50_ms"],
                        "forwarded_p99_ms": forwarded["p99_ms"],
                        "errors": local["errors"] + forwarded["errors"],
                    }
                )
    finally:
        asyncio.run(_database(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    report(
        "gateway_replicas",
        "Forwarding between replicas: through the model's home vs through the other replica",
        rows,
        seconds=SECONDS,
        chunks=CHUNKS,
    )


if __name__ == "__main__":
    main()
