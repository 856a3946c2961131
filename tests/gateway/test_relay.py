"""The stream relay, wherever the upstream's reads happen to split its events."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legator.gateway import relay
from legator.gateway.relay import RelayResponse, StreamState, openai_events, special_start


def _event(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    return b"data: " + payload.encode() + b"\n\n"


DELTAS = [
    _event({"choices": [{"index": 0, "delta": {"content": f"w{i}"}}], "usage": None})
    for i in range(5)
]
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}})
STREAM = b"".join(DELTAS) + USAGE + _event("[DONE]")
GATEWAY = SimpleNamespace(max_answer_bytes=64 * 1024)  # what an Admission's relay reads


class _Reads:
    """An aiohttp response whose body arrives in the given pieces."""

    def __init__(self, pieces: list[bytes], pause: float = 0) -> None:
        self.content = SimpleNamespace(iter_any=lambda: self._pieces(pieces, pause))
        self.released = 0
        self.closed = 0

    def release(self) -> None:
        self.released += 1

    def close(self) -> None:
        self.closed += 1

    @staticmethod
    async def _pieces(pieces: list[bytes], pause: float) -> AsyncIterator[bytes]:
        for piece in pieces:
            if pause:
                await asyncio.sleep(pause)  # a backend slow to produce the next tokens
            yield piece


def _relay(pieces: list[bytes], *, wants_usage: bool) -> tuple[bytes, StreamState]:
    adm: Any = SimpleNamespace(model=SimpleNamespace(id="m"), gateway=GATEWAY)
    state = StreamState()

    async def run() -> bytes:
        out = b""
        async for block in openai_events(adm, _Reads(pieces), state, wants_usage):  # type: ignore[arg-type]
            out += block
        return out

    return asyncio.run(run()), state


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=12)))
    bounds = [0, *cuts, len(data)]
    crlf = draw(st.booleans())
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    return [p.replace(b"\n", b"\r\n") for p in pieces] if crlf else pieces


@settings(max_examples=200, deadline=None)
@given(splits(STREAM))
def test_events_pass_unchanged_and_usage_is_read_however_reads_split(pieces: list[bytes]) -> None:
    relayed, state = _relay(pieces, wants_usage=False)
    assert relayed == b"".join(DELTAS) + _event("[DONE]")  # the injected usage chunk is gone
    assert (state.input_tokens, state.output_tokens, state.chunks) == (7, 5, 5)
    assert state.done and state.status == 200

    relayed, state = _relay(pieces, wants_usage=True)
    assert relayed == STREAM.replace(b"\r\n", b"\n")
    assert state.output_tokens == 5


def test_only_the_tail_from_the_first_event_that_may_end_or_bill_is_looked_into() -> None:
    quoting = _event({"choices": [{"index": 0, "delta": {"content": "data: [DONE] ends it"}}]})
    block = DELTAS[0] + quoting + DELTAS[1] + USAGE + _event("[DONE]")
    assert special_start(DELTAS[0] + DELTAS[1]) == -1  # "usage": null bills nothing
    assert special_start(DELTAS[0] + USAGE) == len(DELTAS[0])
    assert special_start(USAGE + DELTAS[0]) == 0
    assert special_start(block) == len(DELTAS[0])  # a delta quoting [DONE] is looked into

    relayed, state = _relay([block], wants_usage=False)
    assert relayed == DELTAS[0] + quoting + DELTAS[1] + _event("[DONE]")
    assert (state.chunks, state.output_tokens, state.done) == (3, 5, True)


def test_a_stream_cut_short_ends_with_an_error_event_and_done() -> None:
    relayed, state = _relay([DELTAS[0], DELTAS[1][:10]], wants_usage=False)
    assert relayed.startswith(DELTAS[0])
    error = json.loads(relayed.split(b"\n\n")[-3][len(b"data: ") :])
    assert "ended the stream early" in error["error"]["message"]
    assert relayed.endswith(_event("[DONE]"))
    assert state.status == 502


def test_an_event_that_never_ends_is_cut_off_at_the_limit() -> None:
    endless = [b'data: {"choices": [{"delta": {"content": "'] + [b"x" * 1000] * 200
    relayed, state = _relay([DELTAS[0], *endless], wants_usage=False)
    assert relayed.startswith(DELTAS[0]) and b"x" * 100 not in relayed
    error = json.loads(relayed.split(b"\n\n")[-3][len(b"data: ") :])
    assert f"exceeded {GATEWAY.max_answer_bytes} bytes" in error["error"]["message"]
    assert state.status == 502


def test_an_error_event_from_the_backend_fails_the_stream() -> None:
    reported = _event({"error": {"message": "out of memory", "type": "server_error"}})
    relayed, state = _relay([DELTAS[0] + reported + _event("[DONE]")], wants_usage=False)
    assert relayed == DELTAS[0] + reported + _event("[DONE]")  # passed on as it came
    assert state.status == 502 and "out of memory" in (state.error or "")
    # A delta whose text mentions "error" is content, not a failure.
    quoting = _event({"choices": [{"delta": {"content": '{"error": 1}'}}]})
    relayed, state = _relay([quoting + _event("[DONE]")], wants_usage=False)
    assert state.status == 200


def _asgi_messages(pieces: list[bytes]) -> tuple[list[dict[str, Any]], int, _Reads]:
    """What the relay hands the server for a stream read in ``pieces``, and how many times
    it finished (released the slot and billed)."""
    adm: Any = SimpleNamespace(model=SimpleNamespace(id="m"), gateway=GATEWAY)
    upstream, state, finished = _Reads(pieces), StreamState(), []
    content = openai_events(adm, upstream, state, False)  # type: ignore[arg-type]
    response = RelayResponse(content, upstream, state, lambda: finished.append(1))  # type: ignore[arg-type]
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(response({"type": "http"}, receive, send))
    return messages, len(finished), upstream


def test_the_last_block_ends_the_body_in_the_same_message() -> None:
    # One write fewer per stream: the server sends the last block and the end of a chunked
    # body together.
    for pieces in (
        [STREAM],
        [DELTAS[0], DELTAS[1], b"".join(DELTAS[2:]) + USAGE + _event("[DONE]")],
    ):
        messages, finished, upstream = _asgi_messages(pieces)
        start, *bodies = messages
        assert start["type"] == "http.response.start"
        assert [m["more_body"] for m in bodies] == [True] * (len(bodies) - 1) + [False]
        assert bodies[-1]["body"].endswith(_event("[DONE]"))
        assert b"".join(m["body"] for m in bodies) == b"".join(DELTAS) + _event("[DONE]")
        assert (finished, upstream.released) == (1, 1)

    messages, finished, _upstream = _asgi_messages([DELTAS[0], DELTAS[1][:10]])
    assert [m["more_body"] for m in messages[1:]] == [True, True, False]  # the cut-off rest too
    assert b"ended the stream early" in messages[-1]["body"]
    assert finished == 1


def _relay_to(
    pieces: list[bytes], accepts: int, pause: float = 0
) -> tuple[StreamState, _Reads, int, float]:
    """Relays ``pieces`` to a client that takes the first ``accepts`` messages and then no
    more (its receive buffer full): the state, upstream, times finished and seconds taken."""
    adm: Any = SimpleNamespace(model=SimpleNamespace(id="m"), gateway=GATEWAY)
    upstream, state, finished = _Reads(pieces, pause), StreamState(), []
    content = openai_events(adm, upstream, state, False)  # type: ignore[arg-type]
    response = RelayResponse(content, upstream, state, lambda: finished.append(1))  # type: ignore[arg-type]
    sent = 0

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal sent
        sent += 1
        if sent > accepts:
            await asyncio.Event().wait()  # the write never drains

    async def run() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(response({"type": "http"}, receive, send), 10)
        return loop.time() - started

    took = asyncio.run(run())
    return state, upstream, len(finished), took


def test_a_client_that_stops_reading_loses_the_stream_a_slow_backend_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay, "SEND_STALL_S", 0.2)
    # The start and one block go out; the next block's send waits for good.
    state, upstream, finished, took = _relay_to([DELTAS[0], DELTAS[1], STREAM], accepts=2)
    assert state.stalled and state.status == relay.STALLED == 408
    assert (finished, upstream.closed) == (1, 1)  # slot released, usage billed, upstream shut
    # 1 to 1.5 times SEND_STALL_S; a send that waited for good would hit the 10 s wait_for.
    assert 0.2 <= took < 8, took
    # A backend that pauses longer than that between reads is not the client's fault.
    state, upstream, finished, took = _relay_to([*DELTAS, USAGE + _event("[DONE]")], 99, 0.15)
    assert not state.stalled and state.status == 200
    assert (finished, upstream.closed) == (1, 0)
    assert took >= 0.15 * 6
