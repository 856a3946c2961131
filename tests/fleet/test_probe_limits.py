"""What a host holding its own probe key can send is bounded: output only for its active
commands and only so much of it, one policy push in flight however often it says hello,
sends that give up when it stops reading, and short text in what is logged and published.

The socket tests speak the probe protocol directly, as a compromised host would."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select
from websockets.sync.client import ClientConnection, connect

import legator.fleet.hub as hub_module
import legator.fleet.socket as socket_module
from legator.core.errors import ServiceUnavailable
from legator.fleet.hub import Connection, Hub, ProbeNotConnected
from legator.fleet.models import CommandChunk
from legator.fleet.protocol import (
    T_PING,
    Ack,
    CommandResult,
    FileResult,
    Heartbeat,
    OutputChunk,
)
from tests.fleet.e2e.helpers import fleet, record_command
from tests.support import LiveServer

MIB = 1024 * 1024
CHUNK = 64 * 1024  # what the probe reads (and sends) at a time


def _envelope(type_: str, payload: dict[str, Any]) -> str:
    return json.dumps(
        {"id": str(uuid.uuid4()), "type": type_, "ts": "2026-01-01T00:00:00Z", "payload": payload}
    )


def _wait(predicate: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


class RawProbe:
    """A registered probe's socket, driven by hand."""

    def __init__(self, server: LiveServer, api: httpx.Client, ws: ClientConnection, pid: str):
        self.server, self.api, self.ws, self.probe_id = server, api, ws, pid

    def send(self, type_: str, payload: dict[str, Any]) -> None:
        self.ws.send(_envelope(type_, payload))

    def chunk(self, request_id: str, seq: int, data: str, stream: str = "stdout") -> None:
        self.send("output", {"request_id": request_id, "seq": seq, "stream": stream, "data": data})

    def finish(self, request_id: str, **fields: Any) -> None:
        self.send("command_result", {"request_id": request_id, "status": "completed", **fields})

    def command(self) -> str:
        return record_command(self.server, self.probe_id, "uptime")

    def status(self, request_id: str) -> dict[str, Any]:
        return self.api.get(f"/api/v1/commands/{request_id}").json()  # type: ignore[no-any-return]

    def settle(self) -> None:
        """Everything sent so far has been handled: the socket is read in order, so a result
        sent now is stored only after all of it."""
        marker = self.command()
        self.finish(marker)
        _wait(lambda: self.status(marker)["status"] == "completed")


@pytest.fixture
def probe(server: LiveServer, api: httpx.Client) -> Iterator[RawProbe]:
    token = api.post("/api/v1/tokens").json()["token"]
    reg = api.post("/api/v1/register", json={"token": token, "hostname": "hostile"}).json()
    url = server.url.replace("http", "ws") + "/ws/probe"
    with connect(url, additional_headers={"Authorization": f"Bearer {reg['api_key']}"}) as ws:
        yield RawProbe(server, api, ws, reg["probe_id"])


def _stored(server: LiveServer, request_id: str) -> dict[str, int]:
    """Characters of output stored per stream, and how many chunks."""

    async def go() -> dict[str, int]:
        async with server.core.db.session() as session:  # type: ignore[union-attr]
            rows = await session.execute(
                select(
                    CommandChunk.stream,
                    func.count(),
                    func.coalesce(func.sum(func.length(CommandChunk.data)), 0),
                )
                .where(CommandChunk.command_id == request_id)
                .group_by(CommandChunk.stream)
            )
            out = {"chunks": 0}
            for stream, count, chars in rows:
                out[stream] = int(chars)
                out["chunks"] += int(count)
            return out

    return server.call(go())


# ---- output chunks ------------------------------------------------------------------------


def test_output_for_a_finished_command_is_refused(probe: RawProbe) -> None:
    done = probe.command()
    probe.chunk(done, 0, "before the end\n")
    probe.finish(done, exit_code=0)
    _wait(lambda: probe.status(done)["status"] == "completed")
    for seq in range(1, 6):
        probe.chunk(done, seq, "x" * CHUNK)
    probe.settle()
    assert _stored(probe.server, done) == {"chunks": 1, "stdout": len("before the end\n")}


def test_a_finished_commands_result_cannot_be_rewritten(probe: RawProbe) -> None:
    """A compromised host cannot replace what one of its commands found once it finished
    (before, any result but "rejected" overwrote the stored one)."""
    done = probe.command()
    probe.finish(done, exit_code=0, stdout="genuine\n")
    _wait(lambda: probe.status(done)["status"] == "completed")
    probe.finish(done, exit_code=0, stdout="FORGED\n")
    probe.send("command_result", {"request_id": done, "status": "failed", "exit_code": 1})
    probe.settle()
    assert (probe.status(done)["stdout"], probe.status(done)["exit_code"]) == ("genuine\n", 0)


def test_stored_output_is_capped_per_stream_and_marked_truncated(probe: RawProbe) -> None:
    rid = probe.command()
    for seq in range(20):  # 1.25 MiB of stdout, more than the probe ever keeps
        probe.chunk(rid, seq, "o" * CHUNK)
    probe.chunk(rid, 20, "e" * 100, stream="stderr")
    probe.settle()
    stored = _stored(probe.server, rid)
    assert stored["stdout"] == MIB and stored["stderr"] == 100
    assert probe.status(rid)["truncated"] is True
    probe.finish(rid, exit_code=0, truncated=False)  # the probe's own word does not undo it
    _wait(lambda: probe.status(rid)["status"] == "completed")
    assert probe.status(rid)["truncated"] is True


def test_chunks_out_of_order_or_repeated_are_dropped(probe: RawProbe) -> None:
    rid = probe.command()
    probe.chunk(rid, 5, "five\n")
    probe.chunk(rid, 3, "three\n")
    probe.chunk(rid, 5, "five again\n")
    probe.chunk(rid, 6, "six\n")
    probe.settle()
    assert _stored(probe.server, rid) == {"chunks": 2, "stdout": len("five\nsix\n")}
    assert probe.status(rid)["status"] == "running"


def test_a_chunk_larger_than_the_probe_sends_is_refused_at_the_schema() -> None:
    fine = {"request_id": "r", "seq": 0, "stream": "stdout", "data": "x" * CHUNK}
    assert OutputChunk.model_validate(fine).data == fine["data"]
    with pytest.raises(ValidationError):
        OutputChunk.model_validate({**fine, "data": "x" * (CHUNK + 1)})
    with pytest.raises(ValidationError):
        OutputChunk.model_validate({**fine, "seq": 2**31})  # the column is 32-bit


def test_the_server_limits_match_the_probe() -> None:
    from legator.fleet.protocol import MAX_CHUNK_CHARS, OUTPUT_CAP
    from legator.probe import executor

    assert OUTPUT_CAP == executor.OUTPUT_CAP
    # A chunk is one read, and the up to 3 bytes of a character the read before cut.
    assert executor.READ_SIZE + 3 <= MAX_CHUNK_CHARS


def test_a_follower_that_stops_reading_holds_a_bounded_queue_and_misses_nothing(
    probe: RawProbe,
) -> None:
    server = probe.server
    commands = fleet(server).commands
    rid = probe.command()
    follower = commands.stream(rid)

    async def start() -> asyncio.Future[Any]:
        return asyncio.ensure_future(follower.__anext__())

    first = server.call(start())
    _wait(lambda: rid in commands._streams)
    total = 600
    for seq in range(total):  # the follower takes the first, then stops reading
        probe.chunk(rid, seq, f"{seq}\n")
    probe.settle()
    assert _stored(server, rid)["chunks"] == total

    async def backlog() -> list[int]:
        return [queue.qsize() for queue in commands._streams.get(rid, ())]

    sizes = server.call(backlog())
    assert sizes and max(sizes) <= 300, sizes
    probe.finish(rid, exit_code=0)
    _wait(lambda: probe.status(rid)["status"] == "completed")

    async def drain() -> list[Any]:
        items = [await first]
        async for item in follower:
            items.append(item)
        return items

    items = server.call(drain())
    chunks = [item for item in items if isinstance(item, OutputChunk)]
    assert [chunk.seq for chunk in chunks] == list(range(total))
    assert [chunk.data for chunk in chunks[:3]] == ["0\n", "1\n", "2\n"]
    assert items[-1].status == "completed"


# ---- hello and policy pushes --------------------------------------------------------------


def test_repeated_hellos_start_one_policy_push(probe: RawProbe) -> None:
    hello = {
        "probe_id": probe.probe_id,
        "version": "1",
        "hostname": "hostile",
        "max_level": "observe",
    }
    for _ in range(200):  # and never an ack
        probe.send("hello", hello)
    probe.settle()
    assert len(socket_module._pushes) <= 1
    pushed = json.loads(probe.ws.recv(timeout=10))
    assert pushed["type"] == "policy_update"


class _Stuck:
    """A socket whose peer stopped reading: a send never completes."""

    async def send_text(self, _text: str) -> None:
        await asyncio.Event().wait()

    async def close(self, **_kwargs: Any) -> None:
        return None


def _stuck_hub() -> Hub:
    hub = Hub(b"k" * 32)
    hub.connections["p1"] = Connection("p1", _Stuck(), hub.key_for("p1", ""))  # type: ignore[arg-type]
    return hub


def test_a_call_to_a_probe_that_stops_reading_gives_up_within_its_timeout() -> None:
    async def go() -> None:
        hub = _stuck_hub()
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="within"):  # not wait_for's TimeoutError
            await asyncio.wait_for(hub.call("p1", T_PING, {}, wait_s=0.3), 30)
        assert time.monotonic() - started < 15  # its 0.3 s, with room for a stalled machine
        assert not hub._waiters

    asyncio.run(go())


def test_a_send_to_a_probe_that_stops_reading_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "SEND_TIMEOUT_S", 0.3, raising=False)

    async def go() -> None:
        hub = _stuck_hub()
        with pytest.raises(ProbeNotConnected, match="send failed"):
            await asyncio.wait_for(hub.send("p1", T_PING, {}), 5)

    asyncio.run(go())


# ---- text and numbers from the probe ------------------------------------------------------


def test_probe_text_is_clipped() -> None:
    big = "r" * (3 * MIB)
    result = CommandResult.model_validate(
        {"request_id": "i" * 1000, "status": "rejected", "reason": big, "error": big}
    )
    reason, error = result.reason or "", result.error or ""
    assert len(result.request_id or "") <= 64
    assert len(reason) <= 2000 and reason.startswith("rrr")
    assert len(error) <= 2000 and error.endswith("[truncated]")
    failed = FileResult.model_validate({"request_id": "f", "ok": False, "error": big})
    assert len(failed.error or "") <= 2000
    ack = Ack.model_validate({"ref": big, "type": big, "ok": False, "error": big})
    assert len(ack.ref) <= 64 and len(ack.type) <= 255 and len(ack.error or "") <= 2000
    short = CommandResult.model_validate({"status": "failed", "error": "no such file"})
    assert short.error == "no such file"


def test_result_output_is_capped_and_marked_truncated() -> None:
    result = CommandResult.model_validate(
        {"request_id": "r", "status": "completed", "stdout": "o" * (MIB + 10), "stderr": "e"}
    )
    assert len(result.stdout) == MIB and result.stderr == "e" and result.truncated


def test_numbers_that_land_in_fixed_width_columns_are_bounded() -> None:
    for bad in ({"exit_code": 2**40}, {"exit_code": -(2**40)}, {"duration_ms": 2**40}):
        with pytest.raises(ValidationError):
            CommandResult.model_validate({"request_id": "r", "status": "completed", **bad})
    assert CommandResult.model_validate({"status": "failed", "exit_code": -9}).exit_code == -9
    with pytest.raises(ValidationError):  # not JSON: would fail every probe's liveness write
        Heartbeat.model_validate({"cpu_percent": float("nan")})


def test_rejection_reports_are_published_and_logged_short(
    probe: RawProbe, capfd: pytest.CaptureFixture[str]
) -> None:
    server = probe.server

    async def subscribe() -> Any:
        return server.core.events.subscribe("probe.rejected")  # type: ignore[union-attr]

    subscription = server.call(subscribe())
    capfd.readouterr()
    try:
        for _ in range(3):
            probe.send("command_result", {"status": "rejected", "reason": "r" * MIB})
        probe.settle()
        events = [server.call(subscription.get(wait=5)) for _ in range(3)]
    finally:
        subscription.close()
    logged = capfd.readouterr()
    assert all(event is not None for event in events)
    assert all(len(event.data["reason"]) <= 2000 for event in events)
    assert len(logged.out) + len(logged.err) < 100_000
