"""Fleet swarm: N simulated probes (real WebSocket clients speaking the real signed protocol,
in worker processes separate from the control plane) against one `legator serve` process.

Reports: time to register and connect N, control-plane CPU at idle with 30 s heartbeats,
command round-trip p50/p99 under that load, and fan-out of one command to all N.

    FLEET_SWARM_N=5000 .venv/bin/python -m bench fleet_swarm
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import random
import time
from typing import Any

import httpx
import psutil

from bench.common import Server, percentile, report
from legator.fleet import protocol as p

N = int(os.environ.get("FLEET_SWARM_N", "5000"))
WORKERS = int(os.environ.get("FLEET_SWARM_WORKERS", "4"))
IDLE_S = float(os.environ.get("FLEET_SWARM_IDLE_S", "30"))
ROUND_TRIPS = int(os.environ.get("FLEET_SWARM_ROUND_TRIPS", "300"))
HEARTBEAT_S = 30.0


async def _register(client: httpx.AsyncClient, token: str, name: str) -> dict[str, str]:
    response = await client.post(
        "/api/v1/register", json={"token": token, "hostname": name, "tags": ["swarm"]}
    )
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


async def _probe(url: str, ident: dict[str, str], gate: asyncio.Semaphore) -> None:
    """One simulated probe; like the real one it reconnects until told to stop."""
    from websockets.asyncio.client import connect

    verifier = p.Verifier(ident["signing_key"])
    headers = {"Authorization": f"Bearer {ident['api_key']}"}
    backoff = 1.0
    while True:
        try:
            async with gate:  # a bounded number of handshakes in flight per worker
                ws = await connect(
                    url, additional_headers=headers, ping_interval=None, open_timeout=60
                )
        except Exception:
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 30)
            continue
        backoff = 1.0
        try:
            await _session(ws, ident, verifier)
        except Exception:  # noqa: S112 - disconnected: reconnect like a real probe
            continue


async def _session(ws: Any, ident: dict[str, str], verifier: p.Verifier) -> None:
    async with ws:
        hello = p.Hello(
            probe_id=ident["probe_id"],
            version="swarm",
            hostname=ident["probe_id"],
            max_level="diagnose",
        )
        await ws.send(p.new_envelope(p.T_HELLO, hello).model_dump_json())

        async def beats() -> None:
            await asyncio.sleep(random.uniform(0, HEARTBEAT_S))
            while True:
                beat = p.Heartbeat(cpu_percent=5, memory_percent=30, disk_percent=40)
                await ws.send(p.new_envelope(p.T_HEARTBEAT, beat).model_dump_json())
                await asyncio.sleep(HEARTBEAT_S)

        task = asyncio.create_task(beats())
        try:
            async for raw in ws:
                env = p.Envelope.model_validate(json.loads(raw))
                verifier.verify(env)  # a simulated probe still checks every signature
                if env.type == p.T_COMMAND:
                    spec = p.CommandSpec.model_validate(env.payload)
                    result = p.CommandResult(
                        request_id=spec.request_id,
                        status="completed",
                        exit_code=0,
                        stdout="ok\n",
                        duration_ms=0,
                    )
                    await ws.send(p.new_envelope(p.T_COMMAND_RESULT, result).model_dump_json())
                else:
                    ack = p.Ack(ref=env.id, type=env.type)
                    await ws.send(p.new_envelope(p.T_ACK, ack).model_dump_json())
        finally:
            task.cancel()


def _worker(base: str, token: str, names: list[str], conn: Any) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            idents = []
            for start in range(0, len(names), 20):
                batch = names[start : start + 20]
                idents += await asyncio.gather(*(_register(client, token, n) for n in batch))
        conn.send(("registered", len(idents)))
        conn.recv()  # go
        url = base.replace("http", "ws", 1) + "/ws/probe"
        gate = asyncio.Semaphore(64)
        tasks = [asyncio.create_task(_probe(url, ident, gate)) for ident in idents]
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # stop
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def _wait_connected(client: httpx.Client, n: int, timeout: float) -> tuple[float, int]:
    started = time.monotonic()
    connected = 0
    while time.monotonic() - started < timeout:
        connected = client.get("/api/v1/fleet/summary").json()["connected"]
        if connected >= n:
            break
        time.sleep(0.2)
    return time.monotonic() - started, connected


def main() -> None:
    rows: list[dict[str, Any]] = []
    with Server(env={"LEGATOR_LOG_LEVEL": "warning"}) as server:
        auth = {"Authorization": f"Bearer {server.admin_key}"}
        client = httpx.Client(base_url=server.url, headers=auth, timeout=600)
        token = client.post("/api/v1/tokens?multi_use=true").json()["token"]
        names = [f"swarm-{i:05d}" for i in range(N)]
        ctx = mp.get_context("spawn")
        pipes, procs = [], []
        started = time.monotonic()
        for w in range(WORKERS):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(server.url, token, names[w::WORKERS], child))
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        for pipe in pipes:
            pipe.recv()
        register_s = time.monotonic() - started
        rows.append(
            {"case": f"register {N} probes (HTTP)", "value": register_s, "unit": "s", "target": "-"}
        )
        for pipe in pipes:
            pipe.send("go")
        connect_s, connected = _wait_connected(client, N, timeout=300)
        rows.append(
            {
                "case": f"connect {N} probes ({connected} connected)",
                "value": connect_s,
                "unit": "s",
                "target": "-",
            }
        )

        server_proc = psutil.Process(server.proc.pid)  # type: ignore[union-attr]
        time.sleep(5)  # let the connect burst settle
        before = server_proc.cpu_times()
        time.sleep(IDLE_S)
        after = server_proc.cpu_times()
        idle = (after.user + after.system - before.user - before.system) / IDLE_S * 100
        rows.append(
            {
                "case": f"idle CPU, {N} probes, 30 s heartbeats",
                "value": idle,
                "unit": "% of a core",
                "target": "< 15",
            }
        )

        probes = [p_["id"] for p_ in client.get("/api/v1/probes").json() if p_["connected"]]
        latencies = []
        for _ in range(ROUND_TRIPS):
            target = random.choice(probes)
            t0 = time.perf_counter()
            result = client.post(
                f"/api/v1/probes/{target}/command?wait=true", json={"command": "uptime"}
            )
            latencies.append((time.perf_counter() - t0) * 1000)
            assert result.json()["status"] == "completed", result.text
        rows.append(
            {
                "case": "command round-trip p50",
                "value": percentile(latencies, 50),
                "unit": "ms",
                "target": "< 5",
            }
        )
        rows.append(
            {
                "case": "command round-trip p99",
                "value": percentile(latencies, 99),
                "unit": "ms",
                "target": "< 50",
            }
        )

        t0 = time.perf_counter()
        fan = client.post("/api/v1/fleet/by-tag/swarm/command", json={"command": "uptime"}).json()
        fan_s = time.perf_counter() - t0
        ok = sum(1 for r in fan["results"] if r["ok"])
        rows.append(
            {
                "case": f"fan-out to all {N}, all results back ({ok} ok)",
                "value": fan_s,
                "unit": "s",
                "target": "< 5",
            }
        )
        for pipe in pipes:
            pipe.send("stop")
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    report(
        "fleet_swarm",
        f"Fleet swarm: {N} simulated probes, one legator serve",
        rows,
        probes=N,
        workers=WORKERS,
        idle_window_s=IDLE_S,
        round_trips=ROUND_TRIPS,
    )


if __name__ == "__main__":
    main()
