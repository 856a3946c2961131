"""What a request can make the probe do beyond running a command or reading a file, with real
probes against a real control plane: a command the host cannot start, a search pattern that
does not compile or backtracks without end, a file that would block or drain the kernel's
log, files too large (or with lines too long) to hold in memory or send in one message,
processes left behind by a command or by a self-update, and streamed text cut mid-character."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from legator import __version__
from legator.fleet.protocol import FileRequest
from legator.probe import fileops
from tests.fleet.e2e.conftest import ProbeProcess, wait_for
from tests.fleet.e2e.test_commands import _sse
from tests.support import LiveServer

MIB = 1024 * 1024
# The control plane waits 30 s for a file operation's answer: one that waits for it, not for
# the probe's answer, takes longer; the room below is for a slow or stalled machine.
ANSWER_S = 20


def _files_policy(admin: httpx.Client, name: str, paths: list[str]) -> str:
    created = admin.post(
        "/api/v1/policies", json={"name": name, "level": "observe", "paths": paths}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _file_op(admin: httpx.Client, probe: ProbeProcess, **params: object) -> httpx.Response:
    return admin.get(f"/api/v1/probes/{probe.probe_id}/files", params=params, timeout=60)


def test_a_command_the_host_cannot_start_is_answered_as_an_error(
    admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    """``echo`` is observe, but the kernel refuses an argument with a NUL byte: the probe
    must answer at once, not leave the command to be marked lost. One over the 128 KiB the
    kernel takes no longer gets that far: the policy check refuses it unread."""
    probe = spawn_probe("start-err")
    started = time.monotonic()
    done = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?wait=true",
        json={"command": "echo", "args": ["a\x00b"], "timeout_s": 30},
        timeout=60,
    )
    assert done.status_code == 200, done.text
    result = done.json()
    assert result["status"] == "error", result
    assert "null byte" in result["error"] and result["exit_code"] == 127
    assert time.monotonic() - started < 15  # answered, not waited out (30 s and a grace)
    too_long = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?wait=true",
        json={"command": "echo", "args": ["x" * 200_000], "timeout_s": 2},
        timeout=60,
    )
    assert too_long.status_code == 403, too_long.text
    assert "over the 131072 one may have" in too_long.json()["error"]["message"]
    # The probe still runs commands afterwards.
    after = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?wait=true", json={"command": "uptime"}
    )
    assert after.json()["status"] == "completed"


def test_a_search_pattern_that_does_not_compile_is_refused_at_once(
    admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "app.log"
    log.write_text("one\ntwo\n")
    probe = spawn_probe("bad-re", policy=_files_policy(admin, "bad-re", [str(tmp_path)]))
    started = time.monotonic()
    refused = _file_op(admin, probe, op="search", path=str(log), pattern="(")
    assert refused.status_code == 400, refused.text
    assert "pattern" in refused.json()["error"]["message"]
    assert time.monotonic() - started < ANSWER_S
    found = _file_op(admin, probe, op="search", path=str(log), pattern="tw")
    assert found.json()["result"]["matches"] == [{"line": 2, "text": "two"}]


def test_the_kernel_log_queue_is_never_read(admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    """``/proc/kmsg`` is a regular file whose read blocks until the kernel logs something and
    takes each message away from the system's logger; the built-in ``diagnose`` allows
    ``/proc``. A caller (an MCP client's ``read_file``) would pin one of the probe's few
    worker threads per request, forever."""
    probe = spawn_probe("kmsg", policy="diagnose")
    started = time.monotonic()
    refused = _file_op(admin, probe, op="read", path="/proc/kmsg")
    assert refused.status_code == 400, refused.text
    assert "never serves" in refused.json()["error"]["message"]
    assert time.monotonic() - started < ANSWER_S
    with pytest.raises(fileops.FileDenied, match="never serves"):
        fileops.perform(FileRequest(request_id="r", op="stat", path="/proc/kmsg"), ["/proc"])


def test_readlines_and_search_send_at_most_max_bytes(
    admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A 24 MiB log asked for whole (``end`` far away) or searched for what every line holds:
    the answer is cut at ``max_bytes`` (1 MiB) and says so, rather than one message larger
    than the control plane's socket takes (16 MiB), which ends the probe's connection."""
    log = tmp_path / "big.log"
    line = "x" * 99 + "\n"
    log.write_text(line * (24 * MIB // len(line)))
    probe = spawn_probe("big-file", policy=_files_policy(admin, "big", [str(tmp_path)]))
    lines = _file_op(admin, probe, op="readlines", path=str(log), start=1, end=10**8)
    assert lines.status_code == 200, lines.text
    result = lines.json()["result"]
    assert result["truncated"] is True
    assert MIB - 100 <= sum(len(text) + 1 for text in result["lines"]) <= MIB
    found = _file_op(admin, probe, op="search", path=str(log), pattern="x")
    assert found.status_code == 200, found.text
    matches = found.json()["result"]
    assert len(matches["matches"]) == fileops.MAX_SEARCH_HITS and matches["truncated"] is True
    short = _file_op(admin, probe, op="readlines", path=str(log), start=3, end=4).json()
    assert short["result"] == {"start": 3, "lines": ["x" * 99] * 2, "truncated": False}


PEAK_RSS = """
import resource, sys
from legator import __version__
from legator.fleet.protocol import FileRequest
from legator.probe import fileops
path, op = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
request = FileRequest(request_id="r", op=op, path=path, pattern="never there")
out = fileops.perform(request, [path])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the search's, if any
lines = out.get("lines") or out.get("matches")
print((after - before) // 1024, child // 1024, len(lines), out.get("truncated"))
"""


@pytest.mark.parametrize("op", ["readlines", "search"])
def test_one_enormous_line_is_not_held_in_memory(tmp_path: Path, op: str) -> None:
    """A local user who can write in an allowed directory makes a sparse file of one line,
    256 MiB of NULs without a newline (it costs no disk): reading or searching it must not
    hold the line whole in the probe (root) — a larger one would exhaust its memory."""
    big = tmp_path / "sparse.log"
    with big.open("wb") as handle:
        handle.truncate(256 * MIB)
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(big), op],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mib, child_mib, count, truncated = done.stdout.split()
    assert int(grown_mib) < 32, f"{op} of one 256 MiB line grew the probe by {grown_mib} MiB"
    assert int(child_mib) < 128, f"the search of one 256 MiB line took {child_mib} MiB"
    if op == "readlines":
        assert (count, truncated) == ("1", "True")  # the line, cut at max_bytes


def test_a_pattern_that_backtracks_without_end_does_not_freeze_the_probe(
    admin: httpx.Client, spawn_probe, fleet_server: LiveServer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """``(a+)+$`` against forty a's and a b takes ``re`` longer than the age of the universe,
    holding the GIL all along: the probe stopped heartbeating and answered nothing more,
    not even a ``stat``, until restarted. The search is stopped instead, and the probe
    stays responsive meanwhile."""
    log = tmp_path / "app.log"
    log.write_text("a" * 40 + "b\n")
    policy = _files_policy(admin, "redos", [str(tmp_path)])
    probe = spawn_probe("redos", policy=policy, heartbeat_s=0.5)

    def evil() -> httpx.Response:
        with fleet_server.client(fleet_server.admin_key) as client:
            return _file_op(client, probe, op="search", path=str(log), pattern="(a+)+$")

    with ThreadPoolExecutor(1) as pool:
        searching = pool.submit(evil)
        time.sleep(2)
        seen = admin.get(f"/api/v1/probes/{probe.probe_id}").json()["last_seen_at"]
        started = time.monotonic()
        looked = _file_op(admin, probe, op="stat", path=str(log))
        assert looked.status_code == 200 and time.monotonic() - started < ANSWER_S, looked.text
        wait_for(
            lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["last_seen_at"] != seen,
            timeout=15,  # a beat every 0.5 s; a frozen probe sends none
        )
        stopped = searching.result()
    assert stopped.status_code == 400, stopped.text
    assert "stopped after" in stopped.json()["error"]["message"]
    found = _file_op(admin, probe, op="search", path=str(log), pattern="a+b$")
    assert found.json()["result"]["matches"] == [{"line": 1, "text": "a" * 40 + "b"}]


def test_nothing_a_command_leaves_in_the_background_outlives_it(
    admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    """``cmd >/dev/null 2>&1 &`` is observe, and its shell exits at once: the background
    process held no pipe, so no timeout ever came to kill its group, and it ran on as the
    probe's user, past ``timeout_s`` and outside ``max_concurrent`` (with
    ``sha256sum /dev/zero`` instead of ``sleep``, a core burnt for good per request)."""
    probe = spawn_probe("leftover")  # the default observe-only policy
    marker = "61.7771"
    done = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?wait=true",
        json={"command": f"sleep {marker} >/dev/null 2>&1 &", "shell": True, "timeout_s": 5},
    )
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "completed", done.json()
    time.sleep(0.5)
    survivors = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert survivors.stdout.strip() == "", "a background child of the command survived it"


def test_streamed_output_keeps_characters_cut_between_reads(
    admin: httpx.Client, spawn_probe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The probe reads output 64 KiB at a time, which cuts a multi-byte character in two
    wherever a read ends: each piece became U+FFFD in the stream (``systemctl status``,
    localised messages, any UTF-8 file), although the stored result was right."""
    text = "€" * 200_000  # 3 bytes each: 600,000 bytes, read in pieces that cut some
    page = tmp_path / "euro.txt"
    page.write_text(text)
    probe = spawn_probe("utf8")
    started = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command?stream=true",
        json={"command": "cat", "args": [str(page)]},
    )
    assert started.status_code == 200, started.text
    events = _sse(admin, started.json()["stream_url"])
    chunks = [json.loads(e["data"])["data"] for e in events if e["event"] == "stdout"]
    assert len(chunks) > 1
    streamed = "".join(chunks)
    assert streamed.count("\ufffd") == 0 and streamed == text
    assert json.loads(events[-1]["data"])["status"] == "completed"


def test_a_self_update_ends_the_commands_that_were_running(
    admin: httpx.Client, spawn_probe, fleet_server: LiveServer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The probe re-executes itself after an update; a command it was running kept running
    without anyone to kill it at its timeout (the same process, so the same systemd unit)."""
    probe = spawn_probe("upd-run", start=False, max_level="remediate")
    url = f"{fleet_server.url}/download/legator-probe-{__version__}.pyz"
    data = httpx.get(url).content
    pyz = tmp_path / "legator-probe.pyz"
    pyz.write_bytes(data)
    handle = probe.log_path.open("ab")
    probe.proc = subprocess.Popen(  # the zipapp, as the installed unit runs it
        [sys.executable, str(pyz), "run", "--config-dir", str(probe.config_dir)],
        stdout=handle,
        stderr=handle,
    )
    wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
    marker = "62.3419"
    fired = admin.post(
        f"/api/v1/probes/{probe.probe_id}/command",
        json={"command": "sleep", "args": [marker], "timeout_s": 3},
    )
    assert fired.status_code == 200, fired.text
    running = ["pgrep", "-f", f"sleep {marker}"]
    wait_for(lambda: subprocess.run(running, capture_output=True, check=False).returncode == 0)
    sha = hashlib.sha256(data).hexdigest()
    updated = admin.post(
        f"/api/v1/probes/{probe.probe_id}/update",
        json={"url": url, "version": __version__, "sha256": sha},
    )
    assert updated.status_code == 200, updated.text
    time.sleep(4)  # past the command's timeout
    survivors = subprocess.run(running, capture_output=True, text=True, check=False)
    assert survivors.stdout.strip() == "", "a command outlived the update and its timeout"
    wait_for(lambda: admin.get(f"/api/v1/probes/{probe.probe_id}").json()["connected"])
