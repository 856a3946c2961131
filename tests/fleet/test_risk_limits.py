# ruff: noqa: S604  (shell=True here classifies a line; nothing is executed)
"""The risk classifier and the shell lexer on adversarial lines: bounded, and equal to
``shlex`` word for word on ordinary ones."""

from __future__ import annotations

import shlex
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legator.fleet.policy import REMEDIATE, classify
from legator.fleet.policy.lexer import Unparseable, tokens
from legator.fleet.risk import CRITICAL, HIGH, classify_risk

# Each took 2.5 s or more (up to 17 s) before the classifier became linear; the bound is
# generous so that a loaded machine does not fail it, and far below the old cost.
SLOW_BEFORE = {
    "nested substitutions around a long word": "$(" * 31 + "a" * 128_000 + ")" * 31,
    "nested substitutions around many parentheses": "$(" * 31 + "()" * 60_000 + ")" * 31,
    "forty thousand backticks": "`a`" * 40_000,
    "thirty thousand substitutions": "$(a)" * 30_000,
    "a find of 25,000 -exec": "find " + "-exec " * 25_000,
}


@pytest.mark.parametrize("line", SLOW_BEFORE.values(), ids=SLOW_BEFORE.keys())
def test_adversarial_line_is_classified_in_bounded_time(line: str) -> None:
    started = time.perf_counter()
    tier = classify_risk(line, shell=True)
    elapsed = time.perf_counter() - started
    assert tier in (HIGH, CRITICAL)
    assert elapsed < 1.0, f"{elapsed:.2f} s for a line of {len(line)} characters"


def test_a_chain_of_wrappers_is_an_answer_not_a_recursion_error() -> None:
    assert classify_risk("eval " * 25_000 + "ls", shell=True) == CRITICAL
    assert classify_risk("timeout " * 25_000 + "ls", shell=True) == CRITICAL
    assert classify("timeout " * 25_000 + "ls", shell=True) == REMEDIATE


def test_more_commands_than_are_parsed_is_judged_by_every_word() -> None:
    many = "a;" * 64_000
    assert classify_risk(many, shell=True) == HIGH
    assert classify_risk(many + "rm -rf /", shell=True) == CRITICAL
    assert classify_risk(many + "r''m -rf /", shell=True) == CRITICAL  # quotes taken out
    assert classify_risk("ls\n" * 2_000, shell=True) == HIGH  # low when short


def _shlex_tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>(){}")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


PIECES = [*"ab ;&|<>(){}'\"\\\n\t\r=-/$`#!*~", "rm", "\\'", '\\"', "\\\\"]
SHELL_TEXT = st.lists(
    st.sampled_from(PIECES),
    max_size=40,
).map("".join)


@settings(max_examples=3000)
@given(line=SHELL_TEXT)
def test_tokens_equal_shlex(line: str) -> None:
    try:
        expected: list[str] | None = _shlex_tokens(line)
    except ValueError:
        expected = None
    try:
        found: list[str] | None = tokens(line)
    except Unparseable:
        found = None
    assert found == expected
