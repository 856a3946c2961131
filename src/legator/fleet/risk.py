# ruff: noqa: S604  (shell=True here classifies a line; nothing is executed)
"""The risk classifier: low / medium / high / critical, shared by the control plane and the
probe (pure: stdlib and the level classifier only).

Risk answers "how bad if this goes wrong", where the level classifier answers "may this
change anything". They are combined: a command is at least as risky as its level implies
(observe → low, diagnose → medium, remediate → high), and each simple command of a compound
line is looked up on its own, so ``ls; rm -rf /`` is critical. A line that cannot be parsed
is judged by every word in it, so appending text can never lower the risk.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence

from legator.fleet.policy import DIAGNOSE, OBSERVE, REMEDIATE, classify
from legator.fleet.policy.lexer import Unparseable, simple_commands, split_substitutions
from legator.fleet.policy.options import parse
from legator.fleet.policy.unwrap import WRAPPER_SYNTAX

LOW, MEDIUM, HIGH, CRITICAL = "low", "medium", "high", "critical"
TIERS = (LOW, MEDIUM, HIGH, CRITICAL)
_RANK = {tier: index for index, tier in enumerate(TIERS)}
_LEVEL_FLOOR = {OBSERVE: LOW, DIAGNOSE: MEDIUM, REMEDIATE: HIGH}


def tier_rank(tier: str) -> int:
    try:
        return _RANK[tier]
    except KeyError:
        raise ValueError(f"unknown risk tier {tier!r}: expected {', '.join(TIERS)}") from None


def highest(tiers: Iterable[str]) -> str:
    return TIERS[max((tier_rank(t) for t in tiers), default=0)]


CRITICAL_PROGRAMS = frozenset(
    {
        "rm", "srm", "shred", "wipefs", "dd", "mkfs", "mke2fs", "mkswap", "fdisk", "sfdisk",
        "gdisk", "sgdisk", "cfdisk", "parted", "partprobe", "shutdown", "reboot", "poweroff",
        "halt", "kexec", "userdel", "deluser", "groupdel", "delgroup", "killall5", "lvremove",
        "vgremove", "pvremove", "zpool", "zfs", "mdadm", "cryptsetup", "blkdiscard", "format",
    }
)  # fmt: skip
HIGH_PROGRAMS = frozenset(
    {
        "apt", "apt-get", "aptitude", "dpkg", "yum", "dnf", "rpm", "zypper", "pacman", "apk",
        "snap", "flatpak", "pip", "pip3", "npm", "gem", "cargo", "brew", "chmod", "chown",
        "chgrp", "chattr", "setfacl", "mv", "cp", "tee", "ln", "install", "rsync", "scp",
        "truncate", "touch", "mkdir", "rmdir", "useradd", "usermod", "adduser", "groupadd",
        "groupmod", "passwd", "chpasswd", "chage", "kill", "pkill", "killall", "mount",
        "umount", "swapon", "swapoff", "crontab", "at", "modprobe", "rmmod", "insmod",
        "sysctl", "ufw", "firewall-cmd", "update-alternatives", "update-grub", "grub-install",
        "visudo", "git", "unzip", "tar", "gzip", "gunzip", "patch", "make", "ssh", "nc",
        "ncat", "socat", "telnet", "service", "wall", "logger", "renice",
    }
)  # fmt: skip
MEDIUM_PROGRAMS = frozenset(
    {
        "journalctl", "dmesg", "ss", "netstat", "lsof", "du", "find", "locate", "grep",
        "egrep", "fgrep", "rg", "ps", "top", "htop", "ip", "ifconfig", "route", "arp",
        "ping", "ping6", "traceroute", "tracepath", "mtr", "dig", "nslookup", "host",
        "curl", "wget", "strace", "ltrace", "tcpdump", "iostat", "vmstat", "mpstat", "sar",
        "pidstat", "iotop", "iftop", "nethogs", "env", "printenv", "last", "lastlog",
        "getent", "sudo", "docker", "podman", "kubectl", "crictl", "ctr", "nvidia-smi",
        "smartctl", "ethtool", "nmap", "openssl", "awk", "gawk", "sed", "perl", "python",
        "python3", "systemctl", "nft", "iptables", "ip6tables", "iptables-save",
        "init", "telinit",
    }
)  # fmt: skip
# Anything else the level classifier calls observe is low (ls, cat, head, tail, df, free…).

_WRAPPERS = frozenset(
    {"sudo", "doas", "nice", "nohup", "time", "timeout", "ionice", "stdbuf", "command",
     "builtin", "exec", "env", "xargs", "watch", "chroot", "nsenter", "setsid", "unbuffer"}
)  # fmt: skip
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox", "su"})
_SYSTEMCTL_CRITICAL = frozenset({"poweroff", "reboot", "halt", "kexec", "emergency", "rescue"})
_SYSTEMCTL_READ = frozenset(
    {"status", "show", "cat", "list-units", "list-unit-files", "list-timers", "list-sockets",
     "list-dependencies", "is-active", "is-enabled", "is-failed", "is-system-running", "help"}
)  # fmt: skip
_FIREWALL_FLUSH = frozenset({"-F", "--flush", "-X", "--delete-chain", "-Z"})
_FIREWALL_READ = frozenset({"-L", "--list", "-S", "--list-rules", "-C", "--check"})
_WORD = re.compile(r"[A-Za-z0-9_.+-]+")


def _program(word: str) -> str:
    return os.path.basename(word.lstrip("\\")).lower()


def _unwrap(argv: list[str]) -> list[str]:
    """Strip wrappers (sudo, env VAR=1, timeout 5, nice -n 5, xargs…) down to the real argv."""
    while argv and _program(argv[0]) in _WRAPPERS:
        wrapper = _program(argv[0])
        rest = argv[1:]
        syntax = WRAPPER_SYNTAX.get(wrapper)
        if syntax is not None:  # its own option syntax: ``time -o ls rm`` runs rm, not ls
            rest = parse(rest, syntax).words
        while rest and (rest[0].startswith("-") or "=" in rest[0]):
            option = rest.pop(0)
            takes_value = option in ("-n", "-u", "-g", "-c", "-s", "-k", "-p", "-I", "-d", "-C")
            if takes_value and rest:
                rest.pop(0)
        if wrapper == "timeout" and rest and rest[0][:1].isdigit():
            rest.pop(0)
        if wrapper == "watch" and rest:
            return ["sh", "-c", " ".join(rest)]  # watch runs its words as a sh -c line
        argv = rest
    return argv


def _argv_risk(argv: list[str]) -> str:
    argv = _unwrap(list(argv))
    if not argv:
        return LOW
    program, args = _program(argv[0]), argv[1:]
    if program == "eval":
        return highest([HIGH, shell_risk(" ".join(args))])
    if program in _SHELLS:
        for index, arg in enumerate(args):
            if arg.startswith("-") and "c" in arg[1:] and index + 1 < len(args):
                return shell_risk(args[index + 1])
        return HIGH  # an interactive or script shell: whatever it runs
    if program.startswith("mkfs") or program in CRITICAL_PROGRAMS:
        return CRITICAL
    special = _SPECIAL.get(program)
    if special is not None:
        return special(args)
    if program in HIGH_PROGRAMS:
        return HIGH
    if program in MEDIUM_PROGRAMS:
        return MEDIUM
    return LOW


def _systemctl(args: Sequence[str]) -> str:
    verbs = [a for a in args if not a.startswith("-")]
    verb = verbs[0] if verbs else "list-units"
    if verb in _SYSTEMCTL_CRITICAL:
        return CRITICAL
    return MEDIUM if verb in _SYSTEMCTL_READ else HIGH


def _init(args: Sequence[str]) -> str:
    return CRITICAL if any(a in ("0", "6") for a in args) else HIGH


def _iptables(args: Sequence[str]) -> str:
    if any(a in _FIREWALL_FLUSH for a in args):
        return CRITICAL
    if args and all(a in _FIREWALL_READ or a.startswith("-n") or a.startswith("-v") for a in args):
        return MEDIUM
    if "-P" in args or "--policy" in args:
        return CRITICAL
    return HIGH if args else MEDIUM


def _nft(args: Sequence[str]) -> str:
    words = [a for a in args if not a.startswith("-")]
    if words[:1] == ["flush"] or words[:2] in (["delete", "table"], ["delete", "ruleset"]):
        return CRITICAL
    return MEDIUM if words[:1] == ["list"] else HIGH


def _find(args: Sequence[str]) -> str:
    risk = MEDIUM
    if "-delete" in args:
        risk = CRITICAL
    for index, arg in enumerate(args):
        if arg in ("-exec", "-execdir", "-ok", "-okdir"):
            inner = [a for a in args[index + 1 :] if a not in (";", "\\;", "+")]
            end = next((i for i, a in enumerate(inner) if a in ("-exec", "-execdir")), len(inner))
            risk = highest([risk, _argv_risk(inner[:end]), HIGH])
    return risk


def _kill(args: Sequence[str]) -> str:
    return CRITICAL if "1" in [a for a in args if not a.startswith("-")] else HIGH


def _crontab(args: Sequence[str]) -> str:
    if "-r" in args:
        return CRITICAL
    return MEDIUM if args == ["-l"] else HIGH


def _sed(args: Sequence[str]) -> str:
    return HIGH if any(a.startswith("-i") or a == "--in-place" for a in args) else MEDIUM


def _container(args: Sequence[str]) -> str:
    verbs = [a for a in args if not a.startswith("-")]
    verb = verbs[0] if verbs else ""
    if verb in ("ps", "images", "logs", "inspect", "stats", "top", "version", "info", "events"):
        return MEDIUM
    if (verb == "system" and "prune" in verbs) or verb in ("rmi", "prune"):
        return CRITICAL if "-a" in args or "--all" in args or "--volumes" in args else HIGH
    return HIGH


def _kubectl(args: Sequence[str]) -> str:
    verbs = [a for a in args if not a.startswith("-")]
    verb = verbs[0] if verbs else ""
    if verb in ("get", "describe", "logs", "top", "explain", "version", "api-resources"):
        return MEDIUM
    if verb == "delete" and any(v in ("namespace", "ns", "node", "pv", "--all") for v in args):
        return CRITICAL
    return HIGH


_SPECIAL = {
    "systemctl": _systemctl,
    "init": _init,
    "telinit": _init,
    "iptables": _iptables,
    "ip6tables": _iptables,
    "nft": _nft,
    "find": _find,
    "kill": _kill,
    "crontab": _crontab,
    "sed": _sed,
    "docker": _container,
    "podman": _container,
    "nerdctl": _container,
    "kubectl": _kubectl,
}


def _every_word_risk(line: str) -> str:
    """For text that does not parse: any word that names a program counts."""
    words = _WORD.findall(line)
    risks = [_argv_risk([word]) for word in words]
    # A program that is critical only with some arguments (init 0, iptables -F…) counts as
    # critical here: we cannot tell which arguments are its own.
    if any(_program(w) in _SPECIAL for w in words):
        risks.append(CRITICAL)
    return highest([HIGH, *risks])


def shell_risk(line: str) -> str:
    """The risk of a ``/bin/sh -c`` command line: each simple command, as the words the shell
    gives it (a quoted ``sh -c 'ls; rm -rf /'`` stays one word), and each substitution."""
    try:
        outer, inner = split_substitutions(line)
        commands, _, _ = simple_commands(outer)
    except Unparseable:
        return _every_word_risk(line)
    risks = [_LEVEL_FLOOR[classify(line, shell=True)]]
    risks += [_argv_risk(argv) for argv in commands]
    risks += [shell_risk(sub) for sub in inner]
    return highest(risks)


def classify_risk(command: str, args: Sequence[str] = (), *, shell: bool = False) -> str:
    """The risk tier of a command. Without ``shell`` it runs as argv, so only the program and
    its arguments count (shell syntax in them is inert)."""
    if shell:
        return shell_risk(" ".join([command, *(shlex.quote(a) for a in args)]))
    floor = _LEVEL_FLOOR[classify(command, args)]
    return highest([floor, _argv_risk([command, *args])])
