"""What a request can make the probe hold, and for how long, with real probes against a real
control plane: a command whose background child keeps its output pipes open, a line far into
a huge file, file operations slow enough to use up the probe's threads, a command that waits
for a slot past its timeout, overlapping self-updates, and a search the probe dies during."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from legator.fleet.protocol import UpdateSpec
from legator.probe import updater
from tests.fleet.e2e.conftest import UNATTENDED, ProbeProcess, wait_for
from tests.fleet.e2e.helpers import fleet
from tests.support import LiveServer

TIB = 1024**4
FAR = 10**9
# The control plane waits 30 s for a file operation's answer; the probe must answer first.
ANSWER_S = 20


def _files_policy(admin: httpx.Client, name: str, paths: list[str]) -> str:
    created = admin.post(
        "/api/v1/policies", json={"name": name, "level": "observe", "paths": paths}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _sparse(path: Path, size: int = TIB) -> Path:
    """A file of ``size`` NUL bytes and no newline: one line, no disk (about 90 minutes to
    read through here)."""
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


def _file_op(admin: httpx.Client, probe: ProbeProcess, **params: object) -> httpx.Response:
    return admin.get(f"/api/v1/probes/{probe.probe_id}/files", params=params, timeout=60)


def _seen(admin: httpx.Client, probe: ProbeProcess) -> str:
    return str(admin.get(f"/api/v1/probes/{probe.probe_id}").json()["last_seen_at"])


def _command(
    admin: httpx.Client, probe: ProbeProcess, body: dict[str, object]
) -> tuple[dict, float]:  # type: ignore[type-arg]
    started = time.monotonic()
    done = admin.post(f"/api/v1/probes/{probe.probe_id}/command?wait=true", json=body, timeout=60)
    assert done.status_code == 200, done.text
    return done.json(), time.monotonic() - started


def _survivors(marker: str) -> str:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
    return found.stdout.strip()


# ---- 1. a background child holding the pipes ------------------------------------------------


def test_a_background_child_holding_the_output_does_not_hold_the_result(
    admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    """``sleep 100 & echo done``: the shell exits at once, but ``sleep`` inherited its
    stdout and stderr. The probe read them until the timeout and answered ``timeout``,
    without the command's exit status, however quickly it had finished."""
    probe = spawn_probe("bg-pipe")  # the default observe-only policy
    for marker, tail, status, code in (
        ("63.1471", "echo done", "completed", 0),
        ("63.1472", "echo done; ls /no/such/legator/dir", "failed", 2),
    ):
        body = {"command": f"sleep {marker} & {tail}", "shell": True, "timeout_s": 30}
        result, took = _command(admin, probe, body)
        assert (result["status"], result["exit_code"]) == (status, code), result
        assert result["stdout"] == "done\n", result
        assert took < 15, f"answered after {took:.1f}s"  # not at the 30 s timeout
        assert _survivors(f"sleep {marker}") == "", "the background child outlived it"
        assert ("No such file" in result["stderr"]) == bool(code), result


def test_binary_output_is_answered_within_what_a_message_may_hold(
    admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    """A NUL takes six characters in JSON (``\\u0000``): the 1 MiB kept of a stream made a
    6 MiB result, which the control plane drops (over 4 MiB), and the command was reported
    lost at its deadline instead (``cat`` of a sparse log, ``lastlog``, a core dump)."""
    probe = spawn_probe("binary-out")
    body = {"command": "head", "args": ["-c", str(1024 * 1024), "/dev/zero"], "timeout_s": 30}
    result, took = _command(admin, probe, body)
    assert result["status"] == "completed", {**result, "stdout": result["stdout"][:10]}
    assert result["truncated"] is True and set(result["stdout"]) == {"\x00"}
    assert len(result["stdout"]) > 100_000 and took < 15  # not lost at the 30 s deadline


# ---- 2. a line far into a huge file ----------------------------------------------------------


def test_readlines_far_into_a_huge_file_stops_in_time(
    admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A sparse 1 TiB file (no disk) asked for line 10**9: the probe read all of it, for an
    hour and a half, long after the control plane had given up (30 s), on one of its threads.
    Even line 1 was read to its end (a line's rest is read and dropped)."""
    huge = _sparse(tmp_path / "huge.log")
    probe = spawn_probe("far-line", policy=_files_policy(admin, "far", [str(tmp_path)]))
    started = time.monotonic()
    far = _file_op(admin, probe, op="readlines", path=str(huge), start=FAR)
    assert time.monotonic() - started < ANSWER_S, far.text
    assert far.status_code == 400, far.text
    message = far.json()["error"]["message"]
    assert "stopped after" in message and str(FAR) in message, message
    started = time.monotonic()
    first = _file_op(admin, probe, op="readlines", path=str(huge), start=1, end=1)
    assert time.monotonic() - started < ANSWER_S, first.text
    assert first.status_code == 200, first.text
    result = first.json()["result"]
    assert result["truncated"] is True and len(result["lines"]) == 1, result
    assert set(result["lines"][0]) == {"\x00"}


def test_a_binary_file_is_answered_within_what_a_message_may_hold(
    admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A NUL takes six characters in JSON (``\\u0000``): the 1 MiB a read sends at most of a
    binary file (``wtmp``, a sparse log, an executable) made a 6 MiB message, which the
    control plane drops (over 4 MiB), and the caller got "did not answer" after 30 s."""
    blob = tmp_path / "wtmp"
    blob.write_bytes(b"\x00" * (2 * 1024 * 1024))
    probe = spawn_probe("binary", policy=_files_policy(admin, "binary", [str(tmp_path)]))
    for op in ("read", "readlines"):
        started = time.monotonic()
        answer = _file_op(admin, probe, op=op, path=str(blob))
        assert answer.status_code == 200 and time.monotonic() - started < 10, answer.text
        result = answer.json()["result"]
        assert result["truncated"] is True
        text = result["content"] if op == "read" else "".join(result["lines"])
        assert len(text) > 100_000 and set(text) == {"\x00"}


# ---- 3. file operations on threads of their own ----------------------------------------------


def _flood(
    fleet_server: LiveServer, probe: ProbeProcess, count: int, path: Path
) -> tuple[ThreadPoolExecutor, list]:  # type: ignore[type-arg]
    """``count`` slow file operations at once, each from its own client; their answers, each
    with when it came (seconds after the flood started)."""
    pool = ThreadPoolExecutor(count)
    started = time.monotonic()

    def one() -> tuple[httpx.Response, float]:
        with fleet_server.client(fleet_server.admin_key) as client:
            answer = _file_op(client, probe, op="readlines", path=str(path), start=FAR)
            return answer, time.monotonic() - started

    return pool, [pool.submit(one) for _ in range(count)]


@pytest.fixture
def flooded(
    admin: httpx.Client, spawn_probe, fleet_server: LiveServer, tmp_path: Path
) -> Iterator[Callable[[int], tuple[ProbeProcess, list]]]:  # type: ignore[no-untyped-def, type-arg]
    huge = _sparse(tmp_path / "huge.log")
    policy = _files_policy(admin, "flood", [str(tmp_path)])
    pools: list[ThreadPoolExecutor] = []

    def flood(count: int) -> tuple[ProbeProcess, list]:  # type: ignore[type-arg]
        probe = spawn_probe(f"flood{count}", policy=policy, heartbeat_s=0.5)
        pool, answers = _flood(fleet_server, probe, count, huge)
        pools.append(pool)
        return probe, answers

    yield flood
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def test_slow_file_operations_do_not_stop_the_heartbeats(admin: httpx.Client, flooded) -> None:  # type: ignore[no-untyped-def]
    """File operations ran on the event loop's default pool (6 threads on 2 CPUs), with the
    heartbeats, the inventory and the self-update: 8 slow reads at once and the probe went
    silent until they ended (here 10 s; on a hung NFS mount, for good)."""
    probe, answers = flooded(8)
    time.sleep(1.5)
    seen = _seen(admin, probe)
    wait_for(lambda: _seen(admin, probe) != seen, timeout=4)
    for future in answers:
        answer, _ = future.result()
        assert answer.status_code == 400, answer.text  # stopped in time, or turned away


def test_file_operations_past_the_queue_are_refused_at_once(admin: httpx.Client, flooded) -> None:  # type: ignore[no-untyped-def]
    """However many come, a few run, a few wait, and the rest are refused at once, saying
    why, instead of piling up behind each other past the control plane's patience."""
    probe, answers = flooded(24)
    results = [future.result() for future in answers]
    refused = [
        took
        for answer, took in results
        if answer.status_code == 400 and "busy" in answer.json()["error"]["message"]
    ]
    assert len(refused) >= 4, [(answer.text[:200], took) for answer, took in results]
    assert sorted(refused)[3] < 3, f"refused after {sorted(refused)[:4]} s"
    for answer, took in results:
        assert answer.status_code == 400 and took < 30, (answer.text, took)
    looked = _file_op(admin, probe, op="stat", path=str(probe.log_path.parent / "huge.log"))
    assert looked.status_code == 200, looked.text


# ---- 4. a command that cannot start within its timeout --------------------------------------


def test_a_command_that_cannot_start_within_its_timeout_never_runs(
    admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """With every slot busy a command waited without limit, then ran: after the control
    plane had reported it lost (its timeout and a grace after sending it), a ``restart``
    or ``rm`` ran that its requester believed never would."""
    probe = spawn_probe("one-slot", max_level="remediate", policy=UNATTENDED, start=False)
    config = probe.config_dir / "probe.yaml"
    config.write_text(config.read_text() + "max_concurrent: 1\n")
    probe.start()
    wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
    time.sleep(0.3)
    busy_until = time.monotonic() + 12
    busy = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command",
        json={"command": "sleep", "args": ["12"], "timeout_s": 20},
    )
    assert busy.status_code == 200, busy.text
    time.sleep(0.5)
    ran = tmp_path / "ran"
    result, took = _command(admin, probe, {"command": "touch", "args": [str(ran)], "timeout_s": 2})
    assert result["status"] == "timeout", result
    assert "never started" in (result["error"] or ""), result
    # At its 2 s, not once the slot is free (about 11 s from here).
    assert took < 9, f"answered after {took:.1f}s"
    time.sleep(max(0.0, busy_until + 1 - time.monotonic()))  # past the busy command's end
    assert not ran.exists(), "the command ran after it was given up"


def test_commands_past_what_may_wait_are_refused_at_once(admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    """However many came, every command waited for a slot, each holding its request (up to
    the 8 MiB a message may be) and a task, for as long as its timeout (up to a day)."""
    probe = spawn_probe("crowd", start=False)
    config = probe.config_dir / "probe.yaml"
    config.write_text(config.read_text() + "max_concurrent: 1\n")
    probe.start()
    wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
    time.sleep(0.3)
    url = f"/api/v1/probes/{probe.probe_id}/command"
    blocker = admin.post(url, json={"command": "sleep", "args": ["8"], "timeout_s": 10})
    assert blocker.status_code == 200, blocker.text
    sent = [
        admin.post(url, json={"command": "echo", "args": [str(n)], "timeout_s": 30})
        for n in range(24)
    ]
    ids = [answer.json()["request_id"] for answer in sent]
    time.sleep(2)
    rows = [admin.get(f"/api/v1/commands/{request_id}").json() for request_id in ids]
    refused = [row for row in rows if row["status"] == "refused" and "busy" in row["error"]]
    assert len(refused) >= 4, [(row["status"], row["error"]) for row in rows]


# ---- 5. self-updates ------------------------------------------------------------------------


class _Trickle(BaseHTTPRequestHandler):
    """An update server that sends one byte a second, for as long as it is left running."""

    stop = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(1024 * 1024))
        self.end_headers()
        while not self.stop.wait(0.3):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:  # the client gave up
                return

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def trickle() -> Iterator[str]:
    _Trickle.stop = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/legator-probe.pyz"
    _Trickle.stop.set()
    server.shutdown()
    server.server_close()


def test_a_second_update_while_one_downloads_is_refused(
    admin: httpx.Client, spawn_probe, fleet_server: LiveServer, trickle: str
) -> None:  # type: ignore[no-untyped-def]
    """Each update downloaded on its own thread of the shared pool, up to 200 MiB in memory
    each: a few at once from a slow server and the probe stopped heartbeating."""
    probe = spawn_probe("upd-twice", max_level="remediate")
    body = {"url": trickle, "version": "9.9.9", "sha256": "0" * 64}
    url = f"/api/v1/probes/{probe.probe_id}/update"

    def first() -> httpx.Response:
        with fleet_server.client(fleet_server.admin_key) as client:
            return client.post(url, json=body, timeout=60)

    with ThreadPoolExecutor(1) as pool:
        downloading = pool.submit(first)
        time.sleep(1.5)
        started = time.monotonic()
        try:
            second = admin.post(url, json=body, timeout=30)
        finally:
            _Trickle.stop.set()
        took = time.monotonic() - started
        assert second.status_code == 400, second.text
        assert "already under way" in second.json()["error"]["message"]
        # Refused at once; one that waited for the first download would wait out the timeout.
        assert took < 15, f"answered after {took:.1f}s"
        assert downloading.result().status_code == 400  # the short download fails its check


def test_an_update_download_is_bounded_in_time(
    trickle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket's 60 s timeout bounds each read: a server sending a byte now and then held
    the download, and with it the one update the probe takes at a time, for good."""
    monkeypatch.setattr(updater, "DOWNLOAD_TIMEOUT_S", 2.0, raising=False)
    spec = UpdateSpec(request_id="r", url=trickle, version="9.9.9", sha256="0" * 64)
    ender = threading.Timer(10, _Trickle.stop.set)  # before the fix: ends the test anyway
    ender.daemon = True
    ender.start()
    started = time.monotonic()
    with pytest.raises(updater.UpdateRefused, match="took over"):
        updater.apply(spec, None)
    assert time.monotonic() - started < 9  # its 2 s, not the ender's 10 s


# ---- 6. a search the probe dies during -------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "search_child"], capture_output=True, text=True
    )
    return [int(line) for line in found.stdout.split()]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie no one reaps (no init in a container) is gone


def test_a_search_does_not_outlive_the_probe(
    admin: httpx.Client, spawn_probe, fleet_server: LiveServer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A search runs in a child the probe kills at 20 s. A probe killed (or crashed, or
    re-executed by a self-update) meanwhile left it behind: ``(a+)+$`` spun a core for good."""
    log = tmp_path / "app.log"
    log.write_text("a" * 40 + "b\n")
    probe = spawn_probe("search-orphan", policy=_files_policy(admin, "orphan", [str(tmp_path)]))
    assert probe.proc is not None
    pid = probe.proc.pid

    def evil() -> httpx.Response:
        with fleet_server.client(fleet_server.admin_key) as client:
            return _file_op(client, probe, op="search", path=str(log), pattern="(a+)+$")

    with ThreadPoolExecutor(1) as pool:
        pool.submit(evil)
        children = wait_for(lambda: _children(pid), timeout=10)
        probe.proc.send_signal(signal.SIGKILL)
        probe.proc.wait()
        try:
            wait_for(lambda: all(_gone(child) for child in children), timeout=35, interval=0.5)
        finally:
            for child in children:  # the test's own leftovers, before the fix
                if not _gone(child):
                    os.kill(child, signal.SIGKILL)


# ---- 7. a message too deeply nested to parse ------------------------------------------------


def test_a_message_nested_too_deep_to_parse_is_rejected_not_fatal(
    admin: httpx.Client, spawn_probe, fleet_server: LiveServer
) -> None:  # type: ignore[no-untyped-def]
    """200 KB of ``[`` make ``json.loads`` raise ``RecursionError``, which is no
    ``ValueError``: it went up through the probe's loop and ended the process, before any
    signature was looked at (whoever holds the socket's other end, a replica or a proxy)."""
    probe = spawn_probe("deep-json")
    assert probe.proc is not None
    depth = 100_000
    raw = (
        '{"id": "deep", "type": "ping", "ts": "2026-01-01T00:00:00Z", "payload": {"a": '
        + "[" * depth
        + "]" * depth
        + "}}"
    )
    connection = fleet(fleet_server).hub.connections[probe.probe_id]
    fleet_server.call(connection.websocket.send_text(raw))
    time.sleep(1)
    assert probe.proc.poll() is None and "RecursionError" not in probe.log(), probe.log()[-2000:]
    result, _ = _command(admin, probe, {"command": "uptime"})
    assert result["status"] == "completed", result
