# ruff: noqa: S604  (shell=True here classifies a line; nothing is executed)
"""A line the checker cannot read is refused by a policy with allow or block lists: the shell
runs every command before a syntax error, so a guess at the line's commands let them past."""

from __future__ import annotations

import subprocess

import pytest

from legator.fleet.policy.decision import Policy, evaluate
from legator.fleet.policy.network import reaches_network
from legator.fleet.policy.unwrap import MAX_DEPTH

BLOCK_RM = Policy(level="remediate", block=("rm",))
ALLOW_LS = Policy(level="remediate", allow=("ls",))
LEVEL_ONLY = Policy(level="remediate")

UNREADABLE_LINES = [
    "ls\nrm -rf /tmp/x\n'",  # an unterminated quote after the commands
    'ls; rm -rf /tmp/x "',
    "ls $((1)); rm -rf /tmp/x",  # arithmetic expansion, which is not classified
    "echo `date`; rm -rf /tmp/x \\",
]


def test_the_shell_runs_what_comes_before_a_syntax_error(tmp_path):
    """Why guessing is unsafe: bash runs the lines before an unterminated quote."""
    marker = tmp_path / "ran"
    subprocess.run(["bash", "-c", f"touch {marker}\n'"], capture_output=True, check=False)
    assert marker.exists()


@pytest.mark.parametrize("line", UNREADABLE_LINES)
@pytest.mark.parametrize("policy", [BLOCK_RM, ALLOW_LS], ids=["block", "allow"])
def test_an_unreadable_line_is_refused_by_a_policy_with_lists(policy, line):
    decision = evaluate(policy, line, shell=True)
    assert not decision.allowed
    assert "cannot be checked against this policy's lists" in decision.reason


@pytest.mark.parametrize("line", UNREADABLE_LINES)
def test_an_unreadable_line_meets_a_level_only_policy_at_the_top_level(line):
    decision = evaluate(LEVEL_ONLY, line, shell=True)
    assert decision.required == "remediate"
    assert decision.allowed
    assert not evaluate(Policy(level="diagnose"), line, shell=True).allowed


def test_an_unreadable_script_given_to_a_shell_as_arguments_is_refused():
    decision = evaluate(BLOCK_RM, "sh", ["-c", "echo $((1)); rm -rf /tmp/x"])
    assert not decision.allowed
    assert "arithmetic expansion" in decision.reason


def test_commands_nested_past_the_limit_are_refused():
    argv = ["sudo"] * (MAX_DEPTH + 2) + ["rm", "-rf", "/tmp/x"]
    decision = evaluate(BLOCK_RM, argv[0], argv[1:])
    assert not decision.allowed
    assert "nested more than" in decision.reason


def test_readable_lines_are_decided_as_before():
    assert evaluate(ALLOW_LS, "ls -l /tmp", shell=True).allowed
    assert not evaluate(BLOCK_RM, "ls; rm -rf /tmp/x", shell=True).allowed
    assert evaluate(BLOCK_RM, "ls; echo rm", shell=True).allowed


def test_an_unreadable_line_may_reach_the_network():
    assert reaches_network("echo $((1)); curl https://example.com", shell=True)
    assert not reaches_network("echo hello; ls", shell=True)
