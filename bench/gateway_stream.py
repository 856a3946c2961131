"""The gateway's cost per stream, quickly: for comparing two commits in one sitting.

Streams of ``GATEWAY_STREAM_CHUNKS`` chunks (32) at concurrency 64, ``GATEWAY_STREAM_ROUNDS``
rounds (3) of 6 s each for direct, the bare relay and Legator, interleaved so that a machine
slowing down hurts all three alike; the medians of streams/s and of each process's CPU per
stream. ``bench gateway`` is the full run (LiteLLM, latency, 1,000 streams, fairness).

``GATEWAY_STREAM_BASELINE=/path/to/other/checkout/src`` adds a second Legator running that
code, interleaved with the others: the way to compare two commits on a noisy machine.
``GATEWAY_STREAM_LOG_LEVEL`` (``warning``) is every Legator's log level: ``info``, the
default, adds the access log's line per request.

Run: ``.venv/bin/python -m bench gateway_stream``
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

from bench.common import Server, free_port, report
from bench.gateway import (
    PROMPT,
    process,
    serve_command,
    setup_gateway,
    stream_rounds,
    wrk_post,
)

SECONDS = 6


def main() -> None:
    chunks = int(os.environ.get("GATEWAY_STREAM_CHUNKS", "32"))
    rounds = int(os.environ.get("GATEWAY_STREAM_ROUNDS", "3"))
    baseline_src = os.environ.get("GATEWAY_STREAM_BASELINE")
    log_level = os.environ.get("GATEWAY_STREAM_LOG_LEVEL", "warning")
    up_port, relay_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    relay = f"http://127.0.0.1:{relay_port}"
    with (
        process(serve_command("upstream_app", up_port), upstream + "/") as upstream_proc,
        process(
            serve_command("bare_relay_app", relay_port), relay + "/", BARE_RELAY_UPSTREAM=upstream
        ) as relay_proc,
        Server(env={"LEGATOR_LOG_LEVEL": log_level}) as server,
        ExitStack() as stack,
    ):
        assert server.proc is not None
        key, _light = setup_gateway(server, upstream)
        path = "/v1/chat/completions"
        systems = {
            "direct": (upstream + path, "unused", "bench"),
            "bare relay": (relay + path, "unused", "bench"),
            "legator": (server.url + path, key, "bench"),
        }
        pids = {
            "upstream": upstream_proc.pid,
            "bare relay": relay_proc.pid,
            "legator": server.proc.pid,
        }
        if baseline_src:
            env = {"LEGATOR_LOG_LEVEL": log_level, "PYTHONPATH": baseline_src}
            baseline = stack.enter_context(Server(env=env))
            assert baseline.proc is not None
            baseline_key, _light = setup_gateway(baseline, upstream)
            systems["legator (baseline)"] = (baseline.url + path, baseline_key, "bench")
            pids["legator (baseline)"] = baseline.proc.pid
        body = {**PROMPT, "model": "bench", "stream": True, "max_tokens": chunks}
        for url, system_key, _model in systems.values():
            wrk_post(url, body, connections=8, duration_s=2, key=system_key)
        medians = stream_rounds(systems, pids, chunks, rounds=rounds, window_s=SECONDS)

    def cpu_ms(name: str) -> float:
        process_name = "upstream" if name == "direct" else name
        return medians[name][f"{process_name}_cpu_ms_per_stream"]

    direct = medians["direct"]["wrk_chunks_per_s"]
    rows: list[dict[str, Any]] = [
        {
            "case": name,
            "streams_per_s": medians[name]["wrk_chunks_per_s"] / chunks,
            "chunks_per_s": medians[name]["wrk_chunks_per_s"],
            "vs_direct": medians[name]["wrk_chunks_per_s"] / direct,
            "cpu_ms_per_stream": cpu_ms(name),
            "cpu_vs_bare_relay": cpu_ms(name) / cpu_ms("bare relay"),
        }
        for name in systems
    ]
    report(
        "gateway_stream",
        f"Gateway streaming cost: {chunks}-chunk streams at concurrency 64 (medians)",
        rows,
        chunks=chunks,
        rounds=rounds,
        seconds=SECONDS,
    )
