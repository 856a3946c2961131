"""kill -9 a real legerd again and again during puts: every acknowledged put survives, and the
store and the audit log stay readable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from legator.secrets.client import Client
from legator.secrets.crypto import load_kek
from legator.secrets.errors import SecretsError
from legator.secrets.store import SecretStore
from tests.support import BIN, free_port

ROUNDS = 6


def start_legerd(state: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            str(BIN / "legerd"),
            "serve",
            "--dev",
            "--state-dir",
            str(state),
            "--socket",
            "",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "LEGERD_KEK": ""},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise TimeoutError("legerd did not start")


@pytest.mark.slow
def test_kill_9_during_puts_loses_no_acknowledged_put(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    acked: dict[tuple[str, int], bytes] = {}
    rng = random.Random(5)
    for round_no in range(ROUNDS):
        proc = start_legerd(state, port)
        stop = threading.Event()

        def writer(round_no: int = round_no, stop: threading.Event = stop) -> None:
            with Client(f"http://127.0.0.1:{port}", timeout=5) as client:
                i = 0
                while not stop.is_set():
                    # Fresh names, and one name that keeps gaining versions.
                    name = f"crash/r{round_no}/{i}" if i % 2 else "crash/counter"
                    value = os.urandom(24)
                    try:
                        version = client.put(name, value)
                    except SecretsError:
                        return  # the daemon died mid-request: not acknowledged
                    acked[(name, version)] = value
                    i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(rng.uniform(0.3, 0.9))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        thread.join(timeout=30)

    assert len(acked) > ROUNDS * 5, "too few puts to mean anything"
    proc = start_legerd(state, port)
    try:
        with Client(f"http://127.0.0.1:{port}") as client:
            for (name, version), value in acked.items():
                assert client.get(name, version) == (value, version), (name, version)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0  # a clean stop after all those kills
    store = SecretStore(state / "secrets.db", load_kek(state / "keys" / "main.key"))
    assert store.verify_all() >= len(acked)
    store.close()
    with (state / "audit.log").open() as log:
        puts = [json.loads(line) for line in log if '"put"' in line]
    audited = {(e["secret"], e["version"]) for e in puts if e["authorized"]}
    assert set(acked) <= audited
