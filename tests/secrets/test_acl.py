"""ACL patterns and policy files (property tests for the matcher)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from legator.secrets.acl import AclError, Action, Policy, Rule

# Printable ASCII without '*': every character a secret name may hold, regex-special included.
literal = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="*"),
    max_size=20,
)


@given(literal.filter(bool))
def test_a_literal_pattern_matches_only_itself(name: str) -> None:
    rule = Rule.build(["get"], [name])
    assert rule.allows(Action.GET, name)
    assert not rule.allows(Action.GET, name + "x")
    assert not rule.allows(Action.GET, "x" + name)
    assert not rule.allows(Action.PUT, name)


@given(literal, literal)
def test_star_matches_any_run(prefix: str, rest: str) -> None:
    rule = Rule.build(["get"], [prefix + "*"])
    assert rule.allows(Action.GET, prefix + rest)
    assert rule.allows(Action.GET, prefix + "a/b/c")


@given(literal, literal, literal)
def test_star_in_the_middle(head: str, middle: str, tail: str) -> None:
    rule = Rule.build(["info"], [f"{head}*{tail}"])
    assert rule.allows(Action.INFO, head + middle + tail)
    # A name that does not start with the head never matches (\x7f cannot start a head).
    if head:
        assert not rule.allows(Action.INFO, "\x7f" + head + middle + tail)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ('{"a": 1}', "JSON list"),
        ('[{"principal": "x", "action": ["get"]}]', "'secret'"),
        ('[{"principal": "x", "action": "get", "secret": ["*"]}]', "'action'"),
        ('[{"principal": "", "action": ["get"], "secret": ["*"]}]', "'principal'"),
        ('[{"principal": "x", "action": ["fly"], "secret": ["*"]}]', "unknown action"),
    ],
)
def test_bad_policy_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "acl.json"
    path.write_text(content)
    with pytest.raises(AclError, match=message):
        Policy.load(path)


def test_policy_matches_principals(tmp_path: Path) -> None:
    path = tmp_path / "acl.json"
    path.write_text(
        json.dumps(
            [
                {"principal": ["tag:a", "unix:*"], "action": ["get"], "secret": ["a/*"]},
                {"principal": "bob@example.com", "action": ["put"], "secret": ["b"]},
            ]
        )
    )
    policy = Policy.load(path)
    assert len(policy.rules_for(["tag:a"])) == 1
    assert len(policy.rules_for(["unix:alice", "uid:1000"])) == 1
    assert policy.rules_for(["tag:ab"]) == []
    assert policy.rules_for(["bob@example.com"])[0].allows(Action.PUT, "b")
    with pytest.raises(AclError, match="no such file"):
        Policy.load(tmp_path / "missing.json")
