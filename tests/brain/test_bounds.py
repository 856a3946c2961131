"""What tools put into a conversation is bounded where it enters: each result, and all the
results the model is shown at once, however many probes a call reaches or how often the model
calls; and the fleet chat's own listing of probes. Real server, real probes, scripted LLM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from legator.brain.agent import RESULTS_BUDGET_CHARS
from legator.brain.router import SESSIONS_LISTED
from legator.brain.tools import MAX_LISTED_PROBES, result_chars
from tests.brain.helpers import Background, dispatches, pending_approval
from tests.brain.llm_server import ScriptedLLM, tool_results
from tests.support import LiveServer, live_server

OUTPUT_CHARS = 4000  # the default LEGATOR_BRAIN_OUTPUT_CHARS


@pytest.fixture
def fleet_server(tmp_path: Path, llm: ScriptedLLM) -> Iterator[LiveServer]:
    with live_server(
        tmp_path / "data",
        fleet_offline_after_s=4,
        fleet_flush_interval_s=0.3,
        fleet_command_grace_s=3,
        llm_provider="openai",
        llm_model="scripted-model",
        llm_api_key="sk-test",
        llm_base_url=f"{llm.url}/v1",
        brain_output_chars=OUTPUT_CHARS,
    ) as server:
        yield server


def _system(body: dict[str, Any]) -> str:
    return str(body["messages"][0]["content"])


def test_fan_out_results_are_bounded_where_they_enter_the_conversation(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM
) -> None:  # type: ignore[no-untyped-def]
    """``run_on_tag`` put every probe's whole output (up to two streams of
    ``brain_output_chars`` each) into one result, and every result of every step stayed in
    the conversation: three probes printing 100 kB, sixteen calls a turn for two turns, and
    the model's third request carried 501,600 characters of tool results, all stored in the
    session. Each result now fits ``result_chars`` (every probe's share shown), and the
    results the model is shown at once fit ``RESULTS_BUDGET_CHARS``: the oldest give way,
    each to a note saying so."""
    probes = [spawn_probe(f"big-{i}", tags="big", policy="unattended") for i in range(3)]
    ids = {p.probe_id for p in probes}
    call = ("run_on_tag", {"tag": "big", "command": "seq", "args": ["1", "20000"], "reason": "r"})
    llm.script = [{"tools": [call] * 16}, {"tools": [call] * 16}, {"text": "Counted."}]
    response = admin.post("/api/v1/fleet/chat", json={"message": "count", "tag": "big"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed" and body["answer"] == "Counted.", body
    per_result = result_chars(OUTPUT_CHARS)

    first = tool_results(llm.requests[1])
    assert len(first) == 16
    sizes = [len(r) for r in first]
    assert max(sizes) <= per_result, sizes
    for text in first:  # every probe is in every result, with the start of its output
        shown = json.loads(text)
        assert set(shown["results"]) == ids, shown
        assert shown["outcomes"] == {"completed, exit 0": 3}
        assert all(r["stdout"].startswith("1\n2\n3\n") for r in shown["results"].values())

    last = tool_results(llm.requests[2])
    assert len(last) == 32
    total = sum(len(r) for r in last)
    assert total <= RESULTS_BUDGET_CHARS, total
    dropped = [r for r in last if r.startswith("[dropped by Legator")]
    assert dropped and last[: len(dropped)] == dropped, total  # the oldest gave way
    assert json.loads(last[-1])["outcomes"] == {"completed, exit 0": 3}  # the newest stayed
    assert "characters" in dropped[0] and "call the tool again" in dropped[0]

    # The session stores the conversation as the model was shown it, so the next message
    # starts within the budget too.
    (session,) = admin.get("/api/v1/probes/tag:big/chat/sessions").json()
    stored = [m["content"] for m in session["messages"] if m["role"] == "tool"]
    assert stored == last and sum(len(m) for m in stored) <= RESULTS_BUDGET_CHARS

    # The operator's record keeps what ran, as before: each probe's output per stream.
    record = body["steps"][0]["tools"][0]["results"]
    assert set(record) == ids
    assert all(len(r["stdout"]) > OUTPUT_CHARS for r in record.values())  # 4000 + its marker


def _enrol_offline(fleet_server: LiveServer, admin: httpx.Client, count: int, tag: str) -> None:
    token = admin.post("/api/v1/tokens", params={"multi_use": "true"}).json()["token"]
    with httpx.Client(base_url=fleet_server.url, timeout=30) as client:
        for n in range(count):
            body = {"token": token, "hostname": f"host-{n:04d}", "tags": [tag]}
            assert client.post("/api/v1/register", json=body).status_code == 201


def test_a_large_fleet_is_listed_to_the_model_within_a_bound(
    fleet_server: LiveServer, admin: httpx.Client, llm: ScriptedLLM
) -> None:
    """Fleet chat listed every probe in its system prompt, at every model request, and
    ``list_probes`` returned every probe: with 10,000 probes, about 700,000 characters each.
    Both now show at most ``MAX_LISTED_PROBES`` and say how many more there are and how to
    narrow the list."""
    count = MAX_LISTED_PROBES + 40
    _enrol_offline(fleet_server, admin, count, "bulk")
    llm.script = [{"tools": [("list_probes", {})]}, {"text": "Many."}]
    response = admin.post("/api/v1/fleet/chat", json={"message": "how many?"})
    assert response.status_code == 200, response.text
    assert response.json()["answer"] == "Many."

    system = _system(llm.requests[0])
    listed = [line for line in system.splitlines() if line.startswith("- prb-")]
    assert len(listed) == MAX_LISTED_PROBES, len(listed)
    assert f"and 40 more of {count} probes" in system and "list_probes" in system

    (result,) = tool_results(llm.requests[1])
    shown = json.loads(result)
    assert shown["total"] == count and len(shown["probes"]) == MAX_LISTED_PROBES
    assert "tag" in shown["not_listed"]
    # A tag narrows it.
    llm.script = [{"tools": [("list_probes", {"tag": "none-such"})]}, {"text": "None."}]
    admin.post("/api/v1/fleet/chat", json={"message": "and none-such?"})
    assert json.loads(tool_results(llm.requests[-1])[0]) == {"total": 0, "probes": []}


def test_a_file_read_asks_the_probe_for_only_what_the_model_is_shown(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """``read_file`` asked the probe for up to a MiB (the protocol's default), sent over its
    socket, to show the model the first ``brain_output_chars`` of its JSON, cut mid-string:
    the model could not tell what it had. The probe now reads only that much and says so."""
    pid = spawn_probe("reader", policy="unattended").probe_id
    big = tmp_path / "big.log"
    big.write_text("line of a large log\n" * 100_000)  # 2 MB
    llm.script = [{"tools": [("read_file", {"probe": pid, "path": str(big)})]}, {"text": "Big."}]
    response = admin.post("/api/v1/fleet/chat", json={"message": "read it", "probe": pid})
    assert response.status_code == 200, response.text
    (result,) = tool_results(llm.requests[1])
    shown = json.loads(result)
    assert shown["truncated"] is True
    assert shown["content"].startswith("line of a large log\n")
    assert len(shown["content"]) <= OUTPUT_CHARS


def test_the_session_list_is_bounded_newest_first(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM
) -> None:  # type: ignore[no-untyped-def]
    """Every message sent without a ``session_id`` (each ``legator chat -m``, a script asking
    on a schedule) starts a session, and the session list answered all of them, each with its
    whole history: a year of hourly questions, 8,760 histories in one answer. It answers the
    newest ``SESSIONS_LISTED`` unless ``limit`` asks for fewer or more (up to 200)."""
    pid = spawn_probe("sessions").probe_id
    count = SESSIONS_LISTED + 5
    llm.script = [{"text": f"answer {n}"} for n in range(count)]
    for n in range(count):
        sent = admin.post(f"/api/v1/probes/{pid}/chat", json={"message": f"question {n}"})
        assert sent.status_code == 200, sent.text
    path = f"/api/v1/probes/{pid}/chat/sessions"
    listed = admin.get(path).json()
    assert len(listed) == SESSIONS_LISTED
    assert listed[0]["messages"][0]["content"] == f"question {count - 1}"  # the newest first
    assert len(admin.get(path, params={"limit": 3}).json()) == 3
    assert len(admin.get(path, params={"limit": 200}).json()) == count
    assert admin.get(path, params={"limit": 201}).status_code == 422


def test_a_fan_out_denied_before_it_ran_still_answers_the_model(
    admin: httpx.Client, spawn_probe, llm: ScriptedLLM, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A fan-out that waited for an approval which was denied has no probe result to share
    the room among; the model is told what happened, with nothing run."""
    for n in range(2):
        spawn_probe(f"q-{n}", tags="q", max_level="remediate", policy="full-remediate")
    victim = tmp_path / "keep"
    victim.mkdir()
    call = {"tag": "q", "command": "rm", "args": ["-rf", str(victim)], "reason": "asked"}
    llm.script = [{"tools": [("run_on_tag", call)]}, {"text": "Not removed."}]
    chat = Background(admin, "/api/v1/fleet/chat", {"message": "remove it", "tag": "q"})
    approval = pending_approval(admin)
    decided = admin.post(f"/api/v1/approvals/{approval['id']}/decide", json={"decision": "deny"})
    assert decided.status_code == 200, decided.text
    body = chat.result().json()
    assert body["status"] == "completed", body
    (result,) = tool_results(llm.requests[1])
    shown = json.loads(result)
    assert (shown["decision"], shown["status"]) == ("queue", "denied"), shown
    assert (shown["probes"], shown["outcomes"], shown["results"]) == (0, {}, {})
    assert victim.exists() and dispatches(admin) == []
