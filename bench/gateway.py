"""The gateway's overhead and fairness, in one run, against one fast local upstream:

- added latency p50/p99, non-streaming, concurrency 1 and 64 (wrk): direct vs this gateway
  vs LiteLLM's proxy (installed by this script into its own venv);
- streaming at concurrency 64: time to first token (a Python client) and chunks/s relayed (wrk,
  medians of interleaved rounds: direct, Legator, LiteLLM and a bare relay take turns);
- 1,000 concurrent streams: errors;
- fairness: a heavy and a light user on a 1-slot model; the light user's median wait against
  its solo wait, with the fair priority and with usage ignored (FIFO-like) for comparison.

Run: ``.venv/bin/python -m bench gateway`` (the first run installs LiteLLM: a few minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from bench.common import Server, console, free_port, percentile, report

DURATION_S = 8
STREAM_CHUNKS = 32  # a stream's length unless the request's max_tokens says otherwise
STREAM_LENGTHS = (32, 64, 128, 256, 1024)  # streaming throughput is measured at each
STREAM_ROUNDS = 3  # interleaved rounds per stream length; the medians are reported
STREAM_WINDOW_S = 4
# LiteLLM relays ≈ 600 chunks/s here: at concurrency 64 a longer stream outlasts the window.
LITELLM_MAX_CHUNKS = 64
MAX_CHUNKS = max(STREAM_LENGTHS)
LITELLM_VENV = Path.home() / ".cache" / "legator-bench" / "litellm-venv"
PROMPT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": STREAM_CHUNKS}

# ----- the upstream: a minimal OpenAI-compatible ASGI app (no framework: as fast as we can) --


def _chunk(i: int) -> bytes:
    data = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "bench",
        "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


_CHUNKS = [_chunk(i) for i in range(MAX_CHUNKS)]


def _usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": 8,
        "completion_tokens": completion_tokens,
        "total_tokens": 8 + completion_tokens,
    }


def _usage_chunk(completion_tokens: int) -> bytes:
    data = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": _usage(completion_tokens),
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


_USAGE = _usage(STREAM_CHUNKS)
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello there"},
                "finish_reason": "stop",
            }
        ],
        "usage": _USAGE,
    }
).encode()


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    request = json.loads(await read_body(receive) or b"{}")
    pace = float(request.get("model", "").partition("@")[2] or 0)  # "name@seconds"
    if not request.get("stream"):
        if pace:
            await asyncio.sleep(pace)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": _COMPLETION})
        return
    count = min(int(request.get("max_tokens") or STREAM_CHUNKS), MAX_CHUNKS)
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for chunk in _CHUNKS[:count]:
        if pace:
            await asyncio.sleep(pace / count)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    wants_usage = (request.get("stream_options") or {}).get("include_usage")
    tail = _usage_chunk(count) if wants_usage else b""
    await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})


# ----- the floor: a bare relay (uvicorn + aiohttp, nothing else) ------------------------------
# What any proxy on this stack pays before doing its own work (authentication, admission,
# accounting, headers, metrics): the gateway's streaming figures are read against it.

_relay: dict[str, Any] = {}


async def bare_relay_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    if "session" not in _relay:
        connector = aiohttp.TCPConnector(limit=4096, limit_per_host=0)
        _relay["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    url = os.environ["BARE_RELAY_UPSTREAM"] + scope["path"]
    headers = {"content-type": "application/json"}
    async with _relay["session"].post(url, data=body, headers=headers) as response:
        content_type = response.headers.get("content-type", "application/json").encode()
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(b"content-type", content_type)],
            }
        )
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def serve(app_name: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        f"bench.gateway:{app_name}",
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        backlog=4096,
    )


def serve_command(app_name: str, port: int) -> list[str]:
    return [sys.executable, "-c", f"from bench.gateway import serve; serve({app_name!r}, {port})"]


@contextmanager
def process(command: list[str], url: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}")
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not come up") from None
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ----- LiteLLM in its own venv ---------------------------------------------------------------


def litellm_binary() -> Path:
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        console.print("[yellow]installing litellm[proxy] into its own venv (first run)…[/]")
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True
        )
    return binary


# ----- load generators -----------------------------------------------------------------------

_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def wrk_post(
    url: str, body: dict[str, Any], *, connections: int, duration_s: int, key: str
) -> dict[str, float]:
    """wrk with a POST body (a Lua script): the C client keeps the load generator from
    being the bottleneck on two cores."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        )
    command = ["wrk", "--latency", f"-t{min(connections, 2)}", f"-c{connections}"]
    command += [f"-d{duration_s}s", "--timeout", "30s", "-s", script.name, url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    latency = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.MULTILINE))

    def ms(text: str) -> float:
        match = re.match(r"([\d.]+)(us|ms|s)", text)
        assert match, text
        return float(match.group(1)) * _UNIT[match.group(2)]

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if "99" not in latency:  # nothing completed: wrk prints no distribution
        console.print(f"[red]wrk got no responses from {url}[/]\n{out}")
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": ms(latency["50"]) if "50" in latency else float("nan"),
        "p99_ms": ms(latency["99"]) if "99" in latency else float("nan"),
        "errors": float(errors + (int(non2xx.group(1)) if non2xx else 0)),
    }


async def _one_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], key: str
) -> tuple[float, int, bool]:
    """(time to first content chunk, chunks, finished with [DONE])."""
    start = time.perf_counter()
    first = 0.0
    chunks = 0
    done = False
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return 0.0, 0, False
        async for raw in response.aiter_raw():
            n = raw.count(b"data: {")
            if n and not first:
                first = time.perf_counter() - start
            chunks += n
            if b"[DONE]" in raw:
                done = True
    return first, chunks, done


async def streams(
    url: str, body: dict[str, Any], key: str, *, concurrency: int, total: int
) -> dict[str, float]:
    limits = httpx.Limits(max_connections=concurrency + 16, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        queue = list(range(total))
        ttft: list[float] = []
        errors = 0
        chunks = 0

        async def worker() -> None:
            nonlocal errors, chunks
            while queue:
                queue.pop()
                try:
                    first, n, done = await _one_stream(client, url, body, key)
                except httpx.HTTPError:
                    errors += 1
                    continue
                if not done or n < body["max_tokens"]:
                    errors += 1
                else:
                    ttft.append(first * 1000)
                    chunks += n

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "chunks_per_s": chunks / elapsed,
        "errors": float(errors),
    }


# ----- fairness ------------------------------------------------------------------------------


async def fairness(
    gateway_url: str, heavy_key: str, light_key: str, model: str
) -> dict[str, float]:
    url = gateway_url + "/v1/chat/completions"
    body = {**PROMPT, "model": model}
    async with httpx.AsyncClient(timeout=120) as client:

        async def timed(key: str) -> float:
            start = time.perf_counter()
            response = await client.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
            response.raise_for_status()
            return (time.perf_counter() - start) * 1000

        solo = [await timed(light_key) for _ in range(10)]
        stop = False

        async def heavy() -> None:
            while not stop:
                await timed(heavy_key)

        workers = [asyncio.create_task(heavy()) for _ in range(8)]
        await asyncio.sleep(2)  # the heavy user builds a queue and a usage record
        contended = []
        rng = random.Random(1)
        for _ in range(20):
            contended.append(await timed(light_key))
            # A random think time: a fixed one would phase-lock the light user's arrivals
            # to the heavy user's 100 ms service periods.
            await asyncio.sleep(rng.uniform(0.1, 0.3))
        stop = True
        await asyncio.gather(*workers)
    return {
        "light_solo_p50_ms": percentile(solo, 50),
        "light_contended_p50_ms": percentile(contended, 50),
        "ratio": percentile(contended, 50) / percentile(solo, 50),
    }


# ----- the run -------------------------------------------------------------------------------


def setup_gateway(server: Server, upstream: str) -> tuple[str, str]:
    """Models, two users with inference keys; returns (heavy key, light key)."""
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"}
    ) as api:
        for model_id, upstream_model, parallel in (
            ("bench", "bench", 1024),
            ("bench-paced", "bench@1.0", 1024),
            ("fair", "fair@0.1", 1),
        ):
            response = api.post(
                "/api/v1/gateway/models",
                json={
                    "id": model_id,
                    "backend_url": upstream + "/v1",
                    "upstream_model": upstream_model,
                    "parallel": parallel,
                },
            )
            response.raise_for_status()
        api.patch("/api/v1/gateway/settings", json={"max_queue": 4096}).raise_for_status()
        keys = []
        for user in ("heavy", "light"):
            api.post(
                "/api/v1/users",
                json={"username": user, "password": "bench password 123", "role": "viewer"},
            ).raise_for_status()
            created = api.post("/api/v1/gateway/keys", json={"user": user})
            created.raise_for_status()
            keys.append(created.json()["key"])
    return keys[0], keys[1]


def litellm_config(upstream: str, directory: Path) -> Path:
    lines = ["model_list:"]
    for name, upstream_model in (("bench", "bench"), ("bench-paced", "bench@1.0")):
        lines += [
            f"  - model_name: {name}",
            "    litellm_params:",
            f"      model: openai/{upstream_model}",
            f"      api_base: {upstream}/v1",
            "      api_key: unused",
        ]
    lines += ["litellm_settings:", "  drop_params: true", "  set_verbose: false"]
    path = directory / "litellm.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def stream_rounds(
    systems: dict[str, tuple[str, str, str]],
    pids: dict[str, int],
    chunks: int,
    *,
    rounds: int = STREAM_ROUNDS,
    window_s: float = STREAM_WINDOW_S,
) -> dict[str, dict[str, float]]:
    """Streams of ``chunks`` chunks at concurrency 64 through each system (URL, key, model),
    ``rounds`` rounds of ``window_s`` interleaved (a machine slowing down meanwhile hurts all
    alike): the medians of chunks/s and of the CPU per stream of the upstream and of the
    system's own process where ``pids`` names it."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in systems}
    for _ in range(rounds):
        for name, (url, key, model) in systems.items():
            body = {**PROMPT, "model": model, "stream": True, "max_tokens": chunks}
            watched = [n for n in pids if n in (name, "upstream")]
            before = {n: cpu_seconds(pids[n]) for n in watched}
            result = wrk_post(url, body, connections=64, duration_s=window_s, key=key)
            console.print(name, chunks, f"chunks per stream: {result['rps']:,.0f} streams/s")
            streams_done = max(1.0, result["rps"] * window_s)
            taken = samples[name]
            taken.setdefault("wrk_chunks_per_s", []).append(result["rps"] * chunks)
            taken.setdefault("wrk_errors", []).append(result["errors"])
            for n in watched:
                spent_ms = (cpu_seconds(pids[n]) - before[n]) / streams_done * 1000
                taken.setdefault(f"{n}_cpu_ms_per_stream", []).append(spent_ms)
    return {
        name: {
            field: sum(values) if field == "wrk_errors" else statistics.median(values)
            for field, values in taken.items()
        }
        for name, taken in samples.items()
    }


def main() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make system-deps` (as root) first")
    litellm = litellm_binary()
    work = Path(tempfile.mkdtemp(prefix="legator-bench-gw-"))
    up_port, lite_port, relay_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    up_cmd = serve_command("upstream_app", up_port)
    relay_cmd = serve_command("bare_relay_app", relay_port)
    lite_cmd = [str(litellm), "--config", str(litellm_config(upstream, work))]
    lite_cmd += ["--host", "127.0.0.1", "--port", str(lite_port), "--num_workers", "1"]
    lite_key = "sk-" + secrets.token_hex(32)  # LiteLLM also authenticates every request
    relay = f"http://127.0.0.1:{relay_port}"
    with (
        process(up_cmd, upstream + "/") as upstream_proc,
        process(relay_cmd, relay + "/", BARE_RELAY_UPSTREAM=upstream) as relay_proc,
        Server(env={"LEGATOR_LOG_LEVEL": "warning"}) as server,
        process(
            lite_cmd,
            f"http://127.0.0.1:{lite_port}/health/liveliness",
            LITELLM_LOG="ERROR",
            LITELLM_MASTER_KEY=lite_key,
        ),
    ):
        heavy_key, light_key = setup_gateway(server, upstream)
        systems = {
            "direct": (upstream + "/v1/chat/completions", "unused", "bench"),
            "legator": (server.url + "/v1/chat/completions", heavy_key, "bench"),
            "litellm": (f"http://127.0.0.1:{lite_port}/v1/chat/completions", lite_key, "bench"),
        }
        for name, (url, key, model) in systems.items():
            wrk_post(url, {**PROMPT, "model": model}, connections=4, duration_s=2, key=key)
            for connections in (1, 64):
                result = wrk_post(
                    url,
                    {**PROMPT, "model": model},
                    connections=connections,
                    duration_s=DURATION_S,
                    key=key,
                )
                rows.append({"case": f"{name} non-stream", "concurrency": connections, **result})
                console.print(rows[-1])
        # Streaming throughput, with the bare relay as the floor of any proxy on this stack and
        # the CPU each process spent per stream.
        assert server.proc is not None
        pids = {
            "legator": server.proc.pid,
            "bare relay": relay_proc.pid,
            "upstream": upstream_proc.pid,
        }
        streaming = {**systems, "bare relay": (relay + "/v1/chat/completions", "unused", "bench")}
        for chunks in STREAM_LENGTHS:
            if chunks > LITELLM_MAX_CHUNKS:
                streaming.pop("litellm", None)
            entries = stream_rounds(streaming, pids, chunks)
            for name, entry in entries.items():
                if chunks == STREAM_CHUNKS and name in systems:
                    url, key, model = systems[name]
                    body = {**PROMPT, "model": model, "stream": True, "max_tokens": chunks}
                    entry.update(asyncio.run(streams(url, body, key, concurrency=64, total=640)))
                key_name = f"{name.replace(' ', '_')}_stream" + (
                    "" if chunks == STREAM_CHUNKS else f"_{chunks}"
                )
                extra[key_name] = entry
                console.print(name, chunks, "chunks per stream", entry)
        for name, (url, key, _model) in systems.items():
            body = {**PROMPT, "model": "bench-paced", "stream": True}
            result = asyncio.run(streams(url, body, key, concurrency=1000, total=1000))
            extra[f"{name}_1000_streams"] = result
            console.print(name, "1000 streams", result)
        fair = asyncio.run(fairness(server.url, heavy_key, light_key, "fair"))
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"}
        ) as api:
            api.patch("/api/v1/gateway/settings", json={"usage_weight": 0}).raise_for_status()
        # The same run with usage ignored shows what the fair priority buys.
        unfair = asyncio.run(fairness(server.url, heavy_key, light_key, "fair"))
        extra["fairness"] = {"fair": fair, "usage_ignored": unfair}
        console.print(extra["fairness"])
    shutil.rmtree(work, ignore_errors=True)
    by = {(r["case"].split()[0], r["concurrency"]): r for r in rows}
    for name in ("legator", "litellm"):
        for c in (1, 64):
            extra[f"{name}_added_p50_ms_c{c}"] = (
                by[(name, c)]["p50_ms"] - by[("direct", c)]["p50_ms"]
            )
            extra[f"{name}_added_p99_ms_c{c}"] = (
                by[(name, c)]["p99_ms"] - by[("direct", c)]["p99_ms"]
            )
    for chunks in STREAM_LENGTHS:
        tail = "" if chunks == STREAM_CHUNKS else f"_{chunks}"
        direct = extra[f"direct_stream{tail}"]["wrk_chunks_per_s"]
        for name in ("legator", "bare_relay"):
            ratio = extra[f"{name}_stream{tail}"]["wrk_chunks_per_s"] / direct
            prefix = "" if name == "legator" else "bare_relay_"
            extra[f"{prefix}stream_throughput_vs_direct{tail}"] = ratio
    report(
        "gateway",
        "Gateway: direct vs Legator vs LiteLLM (same upstream, one run)",
        rows,
        duration_s=DURATION_S,
        stream_chunks=STREAM_CHUNKS,
        **extra,
        targets={
            "added_p50_c1_ms": 1.5,
            "added_p50_vs_litellm": "<= 1/5",
            "stream_throughput_vs_direct": ">= 0.9",
            "errors_1000_streams": 0,
            "fairness_ratio": "< 2",
        },
    )


if __name__ == "__main__":
    main()
