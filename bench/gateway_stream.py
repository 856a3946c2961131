"""The gateway's cost per stream, quickly: for comparing two commits in one sitting.

Streams of ``GATEWAY_STREAM_CHUNKS`` chunks (32) at concurrency 64, ``GATEWAY_STREAM_ROUNDS``
rounds (3) of 6 s each for direct, the bare relay and Legator, interleaved so that a machine
slowing down hurts all three alike; the medians of streams/s and of each process's CPU per
stream. ``bench gateway`` is the full run (LiteLLM, latency, 1,000 streams, fairness).

``GATEWAY_STREAM_BASELINE=/path/to/other/checkout/src`` adds a second Legator running that
code, interleaved with the others: the way to compare two commits on a noisy machine.

Run: ``.venv/bin/python -m bench gateway_stream``
"""

from __future__ import annotations

import os
import statistics
from contextlib import ExitStack
from typing import Any

from bench.common import Server, console, free_port, report
from bench.gateway import (
    PROMPT,
    cpu_seconds,
    process,
    serve_command,
    setup_gateway,
    wrk_post,
)

SECONDS = 6


def main() -> None:
    chunks = int(os.environ.get("GATEWAY_STREAM_CHUNKS", "32"))
    rounds = int(os.environ.get("GATEWAY_STREAM_ROUNDS", "3"))
    baseline_src = os.environ.get("GATEWAY_STREAM_BASELINE")
    up_port, relay_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    relay = f"http://127.0.0.1:{relay_port}"
    with (
        process(serve_command("upstream_app", up_port), upstream + "/") as upstream_proc,
        process(
            serve_command("bare_relay_app", relay_port), relay + "/", BARE_RELAY_UPSTREAM=upstream
        ) as relay_proc,
        Server(env={"LEGATOR_LOG_LEVEL": "warning"}) as server,
        ExitStack() as stack,
    ):
        assert server.proc is not None
        key, _light = setup_gateway(server, upstream)
        keys = {"legator": key}
        body = {**PROMPT, "model": "bench", "stream": True, "max_tokens": chunks}
        # (base URL, the process whose CPU is read)
        targets = {
            "direct": (upstream, upstream_proc.pid),
            "bare relay": (relay, relay_proc.pid),
            "legator": (server.url, server.proc.pid),
        }
        if baseline_src:
            env = {"LEGATOR_LOG_LEVEL": "warning", "PYTHONPATH": baseline_src}
            baseline = stack.enter_context(Server(env=env))
            assert baseline.proc is not None
            keys["legator (baseline)"], _light = setup_gateway(baseline, upstream)
            targets["legator (baseline)"] = (baseline.url, baseline.proc.pid)
        for name, (base, _pid) in targets.items():
            wrk_post(
                base + "/v1/chat/completions",
                body,
                connections=8,
                duration_s=2,
                key=keys.get(name, key),
            )
        streams: dict[str, list[float]] = {name: [] for name in targets}
        cpu_ms: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (base, pid) in targets.items():
                before = cpu_seconds(pid)
                result = wrk_post(
                    base + "/v1/chat/completions",
                    body,
                    connections=64,
                    duration_s=SECONDS,
                    key=keys.get(name, key),
                )
                done = max(1.0, result["rps"] * SECONDS)
                streams[name].append(result["rps"])
                cpu_ms[name].append((cpu_seconds(pid) - before) / done * 1000)
                console.print(name, f"{result['rps']:,.0f} streams/s")
    direct = statistics.median(streams["direct"])
    relay_cpu = statistics.median(cpu_ms["bare relay"])
    rows: list[dict[str, Any]] = [
        {
            "case": name,
            "streams_per_s": statistics.median(streams[name]),
            "chunks_per_s": statistics.median(streams[name]) * chunks,
            "vs_direct": statistics.median(streams[name]) / direct,
            "cpu_ms_per_stream": statistics.median(cpu_ms[name]),
            "cpu_vs_bare_relay": statistics.median(cpu_ms[name]) / relay_cpu,
        }
        for name in targets
    ]
    report(
        "gateway_stream",
        f"Gateway streaming cost: {chunks}-chunk streams at concurrency 64 (medians)",
        rows,
        chunks=chunks,
        rounds=rounds,
        seconds=SECONDS,
    )
