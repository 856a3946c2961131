# ruff: noqa: S604  (shell=True here classifies a line; nothing is executed)
"""The risk classifier: the lists the issue names, compound lines, and monotonicity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legator.fleet.risk import CRITICAL, HIGH, LOW, MEDIUM, classify_risk, tier_rank

EXPECTED = {
    CRITICAL: [
        "rm -rf /tmp/x", "dd if=/dev/zero of=/dev/sda", "mkfs.ext4 /dev/sdb1", "fdisk /dev/sda",
        "parted /dev/sda rm 1", "shutdown -h now", "reboot", "poweroff", "init 0", "init 6",
        "iptables -F", "ip6tables --flush", "nft flush ruleset", "userdel bob",
        "systemctl reboot", "sudo rm -f /etc/hosts", "find /var -name '*.log' -delete",
        "ls; rm -rf /", "ls $(rm -rf /)", "echo ok && dd if=/dev/zero of=/dev/sda",
        "bash -c 'mkfs.xfs /dev/sdc'", "crontab -r",
    ],
    HIGH: [
        "systemctl restart nginx", "systemctl stop nginx", "systemctl start nginx",
        "apt-get install -y nginx", "apt remove nginx", "yum install httpd", "dnf remove x",
        "pip install requests", "chmod 600 /etc/shadow", "chown root /x", "mv a b", "cp a b",
        "tee /etc/motd", "sed -i s/a/b/ /etc/hosts", "truncate -s 0 /var/log/syslog",
        "echo x > /etc/motd", "kill 1234", "useradd eve", "curl -o /usr/bin/x http://h/x",
    ],
    MEDIUM: [
        "journalctl -u nginx", "dmesg", "ss -tlnp", "netstat -an", "lsof -i", "du -sh /var",
        "find / -name x", "grep root /etc/passwd", "ps aux", "ip addr", "systemctl status x",
        "iptables -L -n", "ps aux | grep nginx", "docker ps", "kubectl get pods",
    ],
    LOW: ["ls -la", "cat /etc/hostname", "head -n 5 f", "tail f", "df -h", "free -m", "uptime",
          "uname -a", "whoami", "date", "df -h && free -m"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("tier", "line"), [(tier, line) for tier, lines in EXPECTED.items() for line in lines]
)
def test_tiers(tier: str, line: str) -> None:
    assert classify_risk(line, shell=True) == tier


def test_unparseable_is_at_least_high() -> None:
    assert classify_risk("ls 'unterminated", shell=True) == HIGH
    assert classify_risk("ls 'x; init 0", shell=True) == CRITICAL  # any word may be a program


def test_argv_mode_ignores_shell_syntax_in_arguments() -> None:
    assert classify_risk("ls", ["; rm -rf /"]) == LOW
    assert classify_risk("rm", ["-rf", "/tmp/x"]) == CRITICAL
    assert classify_risk("/usr/bin/systemctl", ["restart", "nginx"]) == HIGH


# Bases are well-formed lines: closing an unbalanced quote can turn an unparseable (high)
# line into a harmless one, which hides nothing.
COMMANDS = st.sampled_from([line for lines in EXPECTED.values() for line in lines])
SEPARATORS = st.sampled_from([";", " && ", " || ", " | ", "\n", " & ", " ; "])
SUFFIXES = st.one_of(
    COMMANDS,
    st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=30),
    st.sampled_from(["'", '"', "$(", "`", ")", "\\", "2>&1", "> /dev/null", "#"]),
)


@settings(max_examples=400)
@given(command=COMMANDS, separator=SEPARATORS, suffix=SUFFIXES)
def test_appending_never_lowers_risk(command: str, separator: str, suffix: str) -> None:
    before = classify_risk(command, shell=True)
    after = classify_risk(command + separator + suffix, shell=True)
    assert tier_rank(after) >= tier_rank(before), (command, separator, suffix, before, after)


@settings(max_examples=300)
@given(first=COMMANDS, second=COMMANDS, separator=SEPARATORS)
def test_compound_is_as_risky_as_its_riskiest_part(first: str, second: str, separator: str) -> None:
    combined = classify_risk(first + separator + second, shell=True)
    for part in (first, second):
        assert tier_rank(combined) >= tier_rank(classify_risk(part, shell=True))


@given(garbage=st.text(max_size=60))
def test_never_crashes(garbage: str) -> None:
    assert classify_risk(garbage, shell=True) in (LOW, MEDIUM, HIGH, CRITICAL)
