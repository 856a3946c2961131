"""What the transcript (the REST answer, ``/ws/chat``'s ``done``) and the ``command_result``
event keep of ``run_on_tag``: bounded per probe, per fan-out and per conversation, with counts
of what was left out; the fleet's command records keep each probe's whole output."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from legator.brain import tools
from legator.brain.agent import MAX_TOOL_CALLS_PER_TURN
from legator.brain.tools import (
    CONVERSATION_RECORD_CHARS,
    FAN_OUT_RECORD_CHARS,
    Toolbox,
    fan_out_record,
)
from legator.core.auth.principal import Principal
from legator.fleet.models import Command
from tests.brain.llm_server import ScriptedLLM

OUTPUT_CHARS = 4000  # the default LEGATOR_BRAIN_OUTPUT_CHARS
PROBES = 200
OUTPUT = "x" * 99_999 + "\n"  # 100 kB a probe
STEPS = 12  # the default LEGATOR_BRAIN_MAX_STEPS


def _ended(count: int, failing: int = 0) -> dict[str, Command]:
    """``count`` probes' finished commands printing 100 kB, the last ``failing`` exit 1."""
    return {
        f"prb-{n:04d}": Command(
            id=f"req-{n:04d}",
            status="completed",
            exit_code=1 if n >= count - failing else 0,
            stdout=OUTPUT,
            stderr="",
            error=None,
        )
        for n in range(count)
    }


def _toolbox() -> Toolbox:
    state = SimpleNamespace(fleet=None, approvals=None)
    principal = Principal(
        user_id=None, username="alice", role="admin", permissions=frozenset(), method="anonymous"
    )
    return Toolbox(
        state, principal, origin="fleet_chat", approval_wait_s=1, output_chars=OUTPUT_CHARS
    )


def test_one_fan_out_record_is_bounded_and_says_what_it_left_out() -> None:
    """200 probes printing 100 kB each: the record kept every probe's stream at 4,000
    characters, 832,800 characters of JSON for one call. It now fits the fan-out's room,
    the probes that failed come first, and it counts the probes and characters left out."""
    ended = _ended(PROBES, failing=3)
    record = fan_out_record(ended, OUTPUT_CHARS, FAN_OUT_RECORD_CHARS)

    size = len(json.dumps(record))
    assert size <= FAN_OUT_RECORD_CHARS + 1_000, size
    assert record["probes"] == PROBES
    assert record["outcomes"] == {"completed, exit 0": PROBES - 3, "completed, exit 1": 3}
    kept = record["results"]
    assert 0 < len(kept) < PROBES
    assert [v["exit_code"] for v in list(kept.values())[:3]] == [1, 1, 1]  # failures first
    assert all(v["stdout"].startswith("xxx") and v["request_id"] for v in kept.values())
    left = record["not_recorded"]
    assert left["probes"] == PROBES - len(kept)
    whole = PROBES * len(OUTPUT)
    shown = sum(len(v["stdout"].split("\n…[truncated")[0]) for v in kept.values())
    assert left["characters"] == whole - shown
    assert "GET /api/v1/commands/{request_id}" in left["where"]


def test_a_small_fan_out_is_recorded_whole_per_stream_as_before() -> None:
    record = fan_out_record(_ended(3), OUTPUT_CHARS, FAN_OUT_RECORD_CHARS)
    assert len(record["results"]) == 3
    whole_share = "x" * OUTPUT_CHARS + "\n…"
    assert all(v["stdout"].startswith(whole_share) for v in record["results"].values())
    assert record["not_recorded"]["probes"] == 0  # only the streams' tails were cut


def test_a_conversation_of_fan_outs_stays_within_its_bound() -> None:
    """16 calls a turn for 12 turns, each on 200 probes of 100 kB: 192 records of 832,800
    characters, 160 MB held and sent for one conversation. Now at most the conversation's
    room; once spent, later fan-outs are counted only."""
    toolbox = _toolbox()
    records = [
        toolbox._record_fan_out(_ended(PROBES)) for _ in range(STEPS * MAX_TOOL_CALLS_PER_TURN)
    ]
    results = sum(len(json.dumps(r["results"])) for r in records if r["results"])
    assert results <= CONVERSATION_RECORD_CHARS, results
    total = sum(len(json.dumps(r)) for r in records)
    assert total <= CONVERSATION_RECORD_CHARS + len(records) * 1_000, total
    last = records[-1]
    assert last["results"] == {} and last["not_recorded"]["probes"] == PROBES
    assert last["outcomes"] == {"completed, exit 0": PROBES}


def test_a_live_fan_out_record_is_cut_and_the_whole_output_is_still_in_the_fleet(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Real probes, the real server (in this process, so its room can be made small): the
    answer keeps what fits, counts the rest, and each probe's whole output is reachable
    through its command record."""
    monkeypatch.setattr(tools, "CONVERSATION_RECORD_CHARS", 1_000)
    probes = [spawn_probe(f"rec-{i}", tags="rec", policy="unattended") for i in range(3)]
    call = ("run_on_tag", {"tag": "rec", "command": "seq", "args": ["1", "20000"], "reason": "r"})
    llm.script = [{"tools": [call, call]}, {"text": "Done."}]
    response = admin.post("/api/v1/fleet/chat", json={"message": "count", "tag": "rec"})
    assert response.status_code == 200, response.text
    first, second = response.json()["steps"][0]["tools"]

    assert 0 < len(first["results"]) < 3, first
    assert first["not_recorded"]["probes"] == 3 - len(first["results"])
    assert second["results"] == {} and second["not_recorded"]["probes"] == 3
    assert second["outcomes"] == {"completed, exit 0": 3}
    whole = len("".join(f"{n}\n" for n in range(1, 20001)))
    for view in first["results"].values():
        command = admin.get(f"/api/v1/commands/{view['request_id']}").json()
        assert len(command["stdout"]) == whole
    missing = {p.probe_id for p in probes} - set(first["results"])
    for probe_id in missing:
        events = admin.get(
            "/api/v1/audit", params={"action": "fleet.command.dispatch", "target": probe_id}
        ).json()["events"]
        request_id = events[0]["details"]["request_id"]
        assert len(admin.get(f"/api/v1/commands/{request_id}").json()["stdout"]) == whole
