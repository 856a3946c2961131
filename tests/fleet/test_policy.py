# ruff: noqa: S604  (shell=True here classifies a line; nothing is executed)
"""The shared level classifier: known cases, and properties over generated command lines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legator.fleet.policy import (
    DIAGNOSE,
    OBSERVE,
    REMEDIATE,
    Policy,
    classify,
    evaluate,
    rank,
    strongest,
)

CASES = [
    ("ls -la /var/log", OBSERVE),
    ("uptime", OBSERVE),
    ("ps aux | sort -k3 | head", OBSERVE),
    ("ls >/dev/null 2>&1", OBSERVE),
    ("cat < /etc/hosts", OBSERVE),
    ("ip addr show", OBSERVE),
    ("LANG=C ls", OBSERVE),
    ("FOO=1 ls", REMEDIATE),  # any variable but a harmless few can change what runs
    ("journalctl -u nginx --since today", DIAGNOSE),
    ("systemctl status nginx", DIAGNOSE),
    ("ss -tlnp", DIAGNOSE),
    ("find /var -name '*.log'", DIAGNOSE),
    ("curl -s https://example.com/health", DIAGNOSE),
    ("wget -qO- http://x/health", DIAGNOSE),
    ("ls && curl http://x", DIAGNOSE),
    ("iptables -L -n", DIAGNOSE),
    ("ls; rm -rf /", REMEDIATE),
    ("echo $(rm -rf /)", REMEDIATE),
    ('echo "$(reboot)"', REMEDIATE),
    ("echo `reboot`", REMEDIATE),
    ("cat /etc/passwd > /tmp/x", REMEDIATE),
    ("echo hi >> /etc/motd", REMEDIATE),
    ("find / -name x -delete", REMEDIATE),
    ("find / -exec rm {} ;", REMEDIATE),
    ("curl -o /tmp/x http://a", REMEDIATE),
    ("curl -X POST http://a", REMEDIATE),
    ("wget http://a/file", REMEDIATE),
    ("sed -i s/a/b/ /etc/f", REMEDIATE),
    ("systemctl restart nginx", REMEDIATE),
    ("sort -o /etc/x y", REMEDIATE),
    ("ip link set eth0 down", REMEDIATE),
    ("echo 'unterminated", REMEDIATE),
    ("ls\nrm x", REMEDIATE),
    ("cat <<EOF", REMEDIATE),
    ("/usr/bin/rm x", REMEDIATE),
    ("sudo ls", REMEDIATE),
    ("bash -c ls", REMEDIATE),
    ("some-unknown-tool --flag", REMEDIATE),
    ("iptables -F", REMEDIATE),
    ("sysctl -w net.ipv4.ip_forward=1", REMEDIATE),
    ("apt-get install -y nginx", REMEDIATE),
    ("dpkg -l", DIAGNOSE),
    ("tee /etc/x", REMEDIATE),
]


@pytest.mark.parametrize(("line", "level"), CASES)
def test_known_shell_lines(line: str, level: str) -> None:
    assert classify(line, shell=True) == level


def test_argv_mode_ignores_shell_syntax_in_arguments() -> None:
    # Executed as argv, "; rm -rf /" is just an argument to ls.
    assert classify("ls", ["; rm -rf /"]) == OBSERVE
    assert classify("rm", ["-rf", "/tmp/x"]) == REMEDIATE


def test_single_quotes_stop_substitution() -> None:
    assert classify("echo '$(reboot)'", shell=True) == OBSERVE


def test_evaluate_level_block_and_allow() -> None:
    diagnose = Policy(level=DIAGNOSE)
    assert evaluate(diagnose, "journalctl", ["-n", "5"]).allowed
    refused = evaluate(diagnose, "systemctl restart nginx", shell=True)
    assert not refused.allowed and "remediate" in refused.reason
    blocked = Policy(level=REMEDIATE, block=("rm",))
    assert not evaluate(blocked, "ls; rm -rf /tmp/x", shell=True).allowed
    assert evaluate(blocked, "rmdir", ["/tmp/x"]).allowed  # a prefix is a whole word
    allow = Policy(level=REMEDIATE, allow=("systemctl restart nginx", "ls"))
    assert evaluate(allow, "systemctl restart nginx", shell=True).allowed
    assert not evaluate(allow, "ls && whoami", shell=True).allowed
    assert not evaluate(Policy(level=OBSERVE), "ls", requested=DIAGNOSE).allowed


def test_unknown_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown level"):
        rank("god")


SIMPLE = st.sampled_from(
    [
        "ls -la",
        "uptime",
        "cat /etc/hosts",
        "journalctl -n 5",
        "ss -tlnp",
        "find /tmp -name x",
        "find /tmp -delete",
        "rm -rf /tmp/x",
        "systemctl restart nginx",
        "systemctl status nginx",
        "echo hi > /tmp/out",
        "curl -s http://x",
        "curl -o f http://x",
        "sed -i s/a/b/ f",
        "grep -r x /etc",
        "echo $(id)",
        "echo `reboot`",
        "ps aux",
        "df -h 2>&1",
        "sudo ls",
        "unknown-tool",
        "FOO=bar ls",
        "echo 'a;b'",
        'echo "$(whoami)"',
    ]
)
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_./", min_size=1, max_size=8)
OPERATORS = st.sampled_from([";", "&&", "||", "|", "&", "\n"])


@st.composite
def commands(draw: st.DrawFn) -> str:
    base = draw(SIMPLE)
    extra = draw(st.lists(WORD, max_size=3))
    return " ".join([base, *extra])


@settings(max_examples=400, deadline=None)
@given(st.lists(commands(), min_size=2, max_size=5), st.data())
def test_compound_never_weaker_than_its_strongest_part(
    parts: list[str], data: st.DataObject
) -> None:
    line = parts[0]
    for part in parts[1:]:
        line += f" {data.draw(OPERATORS)} {part}"
    expected = strongest(classify(part, shell=True) for part in parts)
    assert rank(classify(line, shell=True)) >= rank(expected), line


@settings(max_examples=300, deadline=None)
@given(commands(), commands())
def test_substitution_never_weaker_than_its_content(outer: str, inner: str) -> None:
    lines = [f"{outer} $({inner})", f'{outer} "$({inner})"']
    if "`" not in inner:  # unescaped backticks do not nest in sh: that is another command
        lines.append(f"{outer} `{inner}`")
    for line in lines:
        assert rank(classify(line, shell=True)) >= rank(classify(inner, shell=True)), line


@settings(max_examples=200, deadline=None)
@given(commands(), WORD)
def test_redirecting_into_a_file_is_remediate(cmd: str, target: str) -> None:
    assert classify(f"{cmd} > /tmp/{target}", shell=True) == REMEDIATE


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_classifier_is_total(line: str) -> None:
    assert classify(line, shell=True) in (OBSERVE, DIAGNOSE, REMEDIATE)
