"""One stream event larger than the gateway takes: the stream ends properly, memory stays
bounded by the cap, the slot is freed."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.gateway.conftest import register, usage_statuses
from tests.gateway.upstreams import LeakyUpstream
from tests.support import LiveServer

MIB = 1024 * 1024
MESSAGES = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def leaky() -> Iterator[LeakyUpstream]:
    server = LeakyUpstream().start()
    yield server
    server.stop()


def _peak_while(read: Callable[[], list[str]]) -> tuple[list[str], int]:
    tracemalloc.start()
    began = time.perf_counter()
    try:
        lines = read()
        print(f"answered in {time.perf_counter() - began:.1f} s (traced)")  # for the record
        return lines, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("size_mib", [64, 100])
def test_an_endless_event_ends_the_stream_within_the_cap(
    gw: LiveServer, admin: httpx.Client, leaky: LeakyUpstream, size_mib: int
) -> None:
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    limit = gateway.max_answer_bytes
    assert limit == 64 * MIB  # the default
    leaky.size = size_mib * MIB
    register(admin, "bigline", leaky.url, upstream_model="bigline")
    body = {"model": "bigline", "stream": True, "messages": MESSAGES}

    def read() -> list[str]:
        with admin.stream("POST", "/v1/chat/completions", json=body) as answer:
            return [line for line in answer.iter_lines() if line.startswith("data:")]

    lines, peak = _peak_while(read)
    print(f"peak {peak / MIB:.1f} MiB, upstream sent {leaky.sent / MIB:.1f} MiB")
    assert lines[-1] == "data: [DONE]"
    assert "exceeded" in json.loads(lines[-2][5:])["error"]["message"]
    assert peak < limit + 16 * MIB
    assert usage_statuses(gw, "bigline") == [502]
    assert gateway.scheduler.pools["bigline"].in_use == 0


# Copies of a big event held at once, at most: the read buffer, the block cut from it, the
# block passed on and the server's write buffer (5.25 measured before the relay copied less);
# translated, more (its JSON parsed, the text encoded again).
@pytest.mark.parametrize(
    ("endpoint", "copies"), [("/v1/chat/completions", 4.5), ("/v1/messages", 7)]
)
def test_a_big_event_within_the_cap_is_relayed(
    gw: LiveServer, admin: httpx.Client, leaky: LeakyUpstream, endpoint: str, copies: float
) -> None:
    leaky.size = 32 * MIB
    register(admin, "bigevent", leaky.url, upstream_model="bigevent")
    body = {"model": "bigevent", "stream": True, "max_tokens": 8, "messages": MESSAGES}

    def read() -> list[str]:
        # The answer's bytes are dropped as they come: the peak is the gateway's.
        size, tail = 0, b""
        with admin.stream("POST", endpoint, json=body) as answer:
            for piece in answer.iter_raw():
                size += len(piece)
                tail = (tail + piece)[-4096:]
        return [str(size), tail.decode()]

    (size, tail), peak = _peak_while(read)
    print(f"{endpoint}: peak {peak / MIB:.1f} MiB, answer {int(size) / MIB:.1f} MiB")
    assert "bye" in tail and int(size) > leaky.size
    assert peak < copies * leaky.size
