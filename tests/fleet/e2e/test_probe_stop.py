"""A command does not outlive its probe: stopped (SIGTERM, SIGINT) or killed (SIGKILL)."""

from __future__ import annotations

import signal
import subprocess

import httpx
import pytest

from tests.fleet.e2e.conftest import UNATTENDED, wait_for


def _running(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    return found.stdout.split()


@pytest.mark.parametrize(
    ("signum", "marker"),
    [(signal.SIGTERM, "301.4173"), (signal.SIGINT, "302.4173"), (signal.SIGKILL, "303.4173")],
    ids=["SIGTERM", "SIGINT", "SIGKILL"],
)
def test_commands_end_with_the_probe(
    admin: httpx.Client,
    spawn_probe,  # type: ignore[no-untyped-def]
    signum: signal.Signals,
    marker: str,
) -> None:
    probe = spawn_probe(f"stop-{signum.name.lower()}", policy=UNATTENDED, max_level="remediate")
    # A child of the shell, in the command's own session: the probe's signal never reaches it.
    body = {"command": f"sleep {marker}; true", "shell": True, "timeout_s": 600}
    fired = admin.post(f"/api/v1/probes/{probe.probe_id}/command", json=body)
    assert fired.status_code == 200, fired.text
    wait_for(lambda: _running(marker))
    assert probe.proc is not None
    probe.proc.send_signal(signum)
    probe.proc.wait(20)
    try:
        wait_for(lambda: not _running(marker), timeout=10)
    finally:
        for pid in _running(marker):
            subprocess.run(["kill", "-9", pid], check=False)
