"""What a policy may cost, with real probes against a real control plane: a long line
against a long block list, a policy entry too long for the API, and one the probe is pushed
that is larger than it takes."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import update

from legator.fleet.models import Policy
from tests.fleet.e2e.conftest import ProbeProcess
from tests.support import LiveServer

LONG_LINE = "true;" * 13000  # 65,000 characters: 13,000 simple commands
BLOCK_100 = [f"prog{i} sub{i}" for i in range(100)]


def _policy(admin: httpx.Client, name: str, **body: object) -> str:
    created = admin.post(
        "/api/v1/policies",
        json={"name": name, "level": "observe", "approval_mode": "none", **body},
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _run(admin: httpx.Client, probe: ProbeProcess, body: dict[str, object]) -> dict:  # type: ignore[type-arg]
    done = admin.post(f"/api/v1/probes/{probe.probe_id}/command?wait=true", json=body, timeout=90)
    assert done.status_code == 200, done.text
    return done.json()  # type: ignore[no-any-return]


def _fastest(admin: httpx.Client, probe: ProbeProcess, body: dict[str, object]) -> float:
    took = []
    for _ in range(2):
        started = time.monotonic()
        result = _run(admin, probe, body)
        took.append(time.monotonic() - started)
        assert result["status"] == "completed", result
    return min(took)


def test_a_long_line_against_100_block_entries_costs_about_the_line_alone(
    admin: httpx.Client, spawn_probe
) -> None:  # type: ignore[no-untyped-def]
    """Every block entry was compared with every part of the line, at both ends, on each
    one's event loop: 13,000 parts and 100 entries took 2.7 s at each end (on the probe,
    heartbeats and every other message waited), against 0.5 s for the line alone. Timed
    against a probe whose policy has no lists, so a busy machine slows both alike."""
    blocked = spawn_probe("block-100", policy=_policy(admin, "block-100", block=BLOCK_100))
    bare = spawn_probe("block-none", policy=_policy(admin, "block-none"))
    body = {"command": LONG_LINE, "shell": True, "timeout_s": 60}
    with_list, without = _fastest(admin, blocked, body), _fastest(admin, bare, body)
    assert with_list < 2 * without + 0.5, (with_list, without)
    refused = admin.post(
        f"/api/v1/probes/{blocked.probe_id}/command?wait=true",
        json={"command": "true; prog7 x sub7", "shell": True},
    )
    assert refused.status_code == 403 and "matches blocked 'prog7 sub7'" in refused.text


@pytest.mark.parametrize(
    ("field", "entries"),
    [
        ("block", ["reboot", "x" * 257]),
        ("allow", ["y" * 10_000]),
        ("paths", ["/" + "p" * 4096]),
        ("block", ["rm"] * 501),
    ],
)
def test_the_api_refuses_a_policy_too_large_naming_the_field(
    admin: httpx.Client, field: str, entries: list[str]
) -> None:
    """An entry of any length was taken (a list had 500 at most): each one is matched
    against every command, at both ends."""
    created = admin.post(
        "/api/v1/policies", json={"name": "too-large", "level": "observe", field: entries}
    )
    assert created.status_code == 422, created.text[:300]
    assert field in str(created.json()), created.text[:300]
    fits = {"block": ["x" * 256] * 500, "allow": ["y" * 256], "paths": ["/" + "p" * 4095]}
    assert (
        admin.post(
            "/api/v1/policies", json={"name": "fits", "level": "observe", **fits}
        ).status_code
        == 201
    )


def test_the_probe_refuses_a_pushed_policy_too_large_and_runs_nothing(
    admin: httpx.Client, spawn_probe, fleet_server: LiveServer
) -> None:  # type: ignore[no-untyped-def]
    """A policy stored before the API's limits (or sent by whoever holds the control
    plane's keys) reached the probe unchecked. Now the probe says why in its ack and refuses
    every command until a policy it takes arrives: keeping its previous policy would keep
    fewer blocks than were meant."""
    legacy = _policy(admin, "legacy", block=["reboot"], paths=["/"])

    async def lengthen() -> None:
        async with fleet_server.core.db.write() as session:  # type: ignore[union-attr]
            entries = ["reboot", "z" * 300]
            await session.execute(update(Policy).where(Policy.id == legacy).values(block=entries))

    fleet_server.call(lengthen())
    probe = spawn_probe("too-large")
    applied = admin.post(f"/api/v1/probes/{probe.probe_id}/apply-policy/{legacy}")
    assert applied.status_code == 200, applied.text
    answer = applied.json()
    assert answer["ok"] is False and "block[1]" in answer["error"], answer
    refused = _run(admin, probe, {"command": "echo", "args": ["hi"]})
    assert refused["status"] == "refused" and "policy too large" in refused["error"], refused
    files = admin.get(f"/api/v1/probes/{probe.probe_id}/files", params={"op": "stat", "path": "/"})
    assert files.status_code == 400 and "outside the allowed paths" in files.text, files.text

    fine = _policy(admin, "fine", block=["reboot"])
    applied = admin.post(f"/api/v1/probes/{probe.probe_id}/apply-policy/{fine}")
    assert applied.json()["ok"] is True, applied.text
    assert _run(admin, probe, {"command": "echo", "args": ["hi"]})["stdout"] == "hi\n"
