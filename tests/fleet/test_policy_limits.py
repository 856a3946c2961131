# ruff: noqa: S604  (shell=True here classifies a line; nothing is executed)
"""What a policy check and the probe's outbox cost, whatever the input: a policy's entries are
compiled once, the matching is linear in the command, and results held while disconnected
are bounded in bytes, not only in number."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import legator.fleet.protocol as p
from legator.fleet.policy import Policy, evaluate
from legator.probe.agent import Agent
from legator.probe.config import ProbeConfig
from legator.probe.outbox import DROPPED_NOTE, Outbox

MIB = 1024 * 1024
BLOCK_100 = tuple(f"prog{i} sub{i}" for i in range(100))


def _seconds(check: Callable[[], object]) -> float:
    started = time.perf_counter()
    check()
    return time.perf_counter() - started


def _extra_cost(policy: Policy, command: str, args: list[str], *, shell: bool) -> float:
    """How much longer ``policy`` takes than a policy without lists, on the same request: a
    ratio of the fastest of 3 runs each, so a busy machine slows both sides alike (a list
    compared part by part cost 6 times the line)."""
    bare = Policy(level=policy.level)
    base = min(_seconds(lambda: evaluate(bare, command, args, shell=shell)) for _ in range(3))
    timed = min(_seconds(lambda: evaluate(policy, command, args, shell=shell)) for _ in range(3))
    return timed / base


def test_a_long_line_against_a_long_block_list_costs_about_the_line_alone() -> None:
    """``a;`` 32,000 times against 100 block entries: every entry was compared with every
    part, each time re-stripped (2.4 s here, 4.6 s on a busy probe, against 0.4 s for the
    line alone), on the probe's only event loop."""
    policy = Policy(level="remediate", block=BLOCK_100)
    assert evaluate(policy, "a;" * 32000, shell=True).allowed
    assert _extra_cost(policy, "a;" * 32000, [], shell=True) < 2.5


def test_a_long_line_against_a_long_allow_list_costs_about_the_line_alone() -> None:
    policy = Policy(level="remediate", allow=("a", *BLOCK_100))
    assert evaluate(policy, "a;" * 32000, shell=True).allowed
    assert _extra_cost(policy, "a;" * 32000, [], shell=True) < 2.5


def test_many_find_exec_words_are_read_once() -> None:
    """Each ``-exec`` read the rest of the arguments up to a ``;``: with none, 20,000 of them
    were 200 million steps (about 15 s here)."""
    policy, words = Policy(level="remediate"), ["-exec"] * 20000
    # The fastest of three: a stall of the machine during one is not the check's.
    assert min(_seconds(lambda: evaluate(policy, "find", words)) for _ in range(3)) < 1.0


def test_a_request_longer_than_the_kernel_takes_is_refused_unread() -> None:
    """A shell line is one argument of ``/bin/sh -c``: past 128 KiB (``MAX_ARG_STRLEN``) it
    cannot run at all, but it was classified all the same, at about 8 µs a character (an
    8 MiB message: a minute of the probe's loop)."""
    for command, args, shell in (
        ("a;" * 100_000, [], True),
        ("echo", ["a;" * 40_000, "b;" * 40_000], True),
        ("sh", ["-c", "a;" * 100_000], False),
    ):
        decision = evaluate(Policy(level="remediate"), command, args, shell=shell)
        assert not decision.allowed and "131072" in decision.reason, decision.reason
    assert evaluate(Policy(level="remediate"), "a;" * 32_000, shell=True).allowed


def test_the_first_entry_of_the_list_is_the_one_named() -> None:
    """The reason names the first entry, in the policy's order, that matches a part or a
    command the line runs, as before the lists were compiled; entries match whole words."""
    policy = Policy(level="remediate", block=("reboot", "ls -l", "l", "rm "))
    reason = evaluate(policy, "echo; ls -l /; rmdir x; sudo /sbin/reboot", shell=True).reason
    assert reason == "'reboot' matches blocked 'reboot'"
    reason = evaluate(policy, "echo; l; ls -l /; rm x", shell=True).reason
    assert reason == "'ls -l /' matches blocked prefix 'ls -l'"
    reason = evaluate(policy, "rmdir x; /bin/rm y", shell=True).reason
    assert reason == "'rm y' matches blocked 'rm '"
    assert evaluate(policy, "lsblk; ls; rmdir x", shell=True).allowed
    allowed = Policy(level="remediate", allow=("ls -l", "echo"))
    assert evaluate(allowed, "echo hi; ls -l /", shell=True).allowed
    reason = evaluate(allowed, "echo hi; ls -la /; lsblk", shell=True).reason
    assert reason == "'ls -la /' matches no allowed prefix"


# ---- the outbox ------------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    config = ProbeConfig(
        server="http://127.0.0.1:1", probe_id="p1", api_key="k", signing_key="0" * 64
    )
    return Agent(config, tmp_path / "probe.yaml")


def _result(index: int) -> p.CommandResult:
    return p.CommandResult(
        request_id=f"r{index}",
        status="completed",
        exit_code=0,
        stdout=chr(ord("a") + index % 26) * MIB,
        stderr="e" * MIB,
    )


def test_the_outbox_is_bounded_in_bytes_by_dropping_the_oldest_output(agent: Agent) -> None:
    """Results kept while disconnected were bounded in number only: 1,000 results of up to
    2 MiB of output each (3 GiB once a NUL is six characters of JSON) for a probe that stays
    away. Past 64 MiB the oldest results lose their output, not their status."""

    async def go() -> None:
        for index in range(40):
            await agent._send(p.T_COMMAND_RESULT, _result(index), keep=True)

    asyncio.run(go())
    kept = [envelope.payload for envelope in agent.outbox]
    assert [r["request_id"] for r in kept] == [f"r{i}" for i in range(40)]
    size = sum(len(envelope.model_dump_json()) for envelope in agent.outbox)
    assert size <= 64 * MIB, size
    dropped = [r for r in kept if not r["stdout"]]
    assert dropped and dropped == kept[: len(dropped)], "the oldest go first"
    for result in dropped:
        assert result["status"] == "completed" and result["exit_code"] == 0
        assert result["truncated"] is True and "outbox" in result["error"], result
    assert kept[-1]["stdout"] == chr(ord("a") + 39 % 26) * MIB


def test_the_outbox_delivers_in_order_and_counts_what_it_holds() -> None:
    """The number bound still drops whole oldest results; what is delivered leaves the
    count of bytes; a result without output, or with an error already, keeps it."""
    outbox = Outbox(limit=3, max_bytes=5 * MIB)
    refused = p.CommandResult(request_id="refused", status="refused", error="policy: no")
    outbox.append(p.new_envelope(p.T_COMMAND_RESULT, refused))
    failed = _result(1).model_copy(update={"status": "failed", "error": "exit 1"})
    outbox.append(p.new_envelope(p.T_COMMAND_RESULT, failed))
    for index in (2, 3):
        outbox.append(p.new_envelope(p.T_COMMAND_RESULT, _result(index)))
    assert [e.payload["request_id"] for e in outbox] == ["r1", "r2", "r3"]
    assert outbox.bytes == sum(len(e.model_dump_json()) for e in outbox) <= 5 * MIB
    first = outbox.first().payload
    assert first["stdout"] == "" and first["error"].startswith(DROPPED_NOTE)
    assert first["error"].endswith("; exit 1") and first["status"] == "failed"
    assert outbox.popleft().payload["request_id"] == "r1"
    assert outbox.bytes == sum(len(e.model_dump_json()) for e in outbox)
    while outbox:
        outbox.popleft()
    assert outbox.bytes == 0
