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

from legator.fleet.policy import DIAGNOSE, OBSERVE, REMEDIATE, classify, strongest
from legator.fleet.policy.argv import classify_argv
from legator.fleet.policy.lexer import (
    MAX_NESTING,
    Unparseable,
    simple_commands,
    split_substitutions,
)
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
_UNQUOTE = str.maketrans("", "", "'\"\\")
_FIND_ACTIONS = frozenset({"-exec", "-execdir", "-ok", "-okdir"})
# Bounds that keep a line's cost linear in its length; no command a person writes comes
# near them, and past them the answer is the worst the text could mean.
MAX_COMMANDS = 1024  # simple commands and substitutions in one line
MAX_WRAPPERS = 16  # ``sudo timeout 5 nice …`` in front of one program
MAX_FIND_ACTIONS = 16  # ``-exec``/``-ok`` actions of one find
_COMMAND_STARTS = ";&|\n`({"
# Substitutions, eval and ``sh -c`` strings inside one another (the lexer allows 32 levels of
# parentheses; this leaves room for those and stops an ``eval eval …`` chain).
_MAX_DEPTH = 2 * MAX_NESTING


def _program(word: str) -> str:
    return os.path.basename(word.lstrip("\\")).lower()


def _unwrap(argv: list[str]) -> list[str] | None:
    """Strip wrappers (sudo, env VAR=1, timeout 5, nice -n 5, xargs…) down to the real argv;
    None past :data:`MAX_WRAPPERS` of them (each costs a pass over the rest of the line)."""
    for _ in range(MAX_WRAPPERS + 1):
        if not argv or _program(argv[0]) not in _WRAPPERS:
            return argv
        wrapper = _program(argv[0])
        rest = argv[1:]
        syntax = WRAPPER_SYNTAX.get(wrapper)
        if syntax is not None:  # its own option syntax: ``time -o ls rm`` runs rm, not ls
            rest = parse(rest, syntax).words
        start = 0
        while start < len(rest) and (rest[start].startswith("-") or "=" in rest[start]):
            option = rest[start]
            start += 1
            takes_value = option in ("-n", "-u", "-g", "-c", "-s", "-k", "-p", "-I", "-d", "-C")
            if takes_value and start < len(rest):
                start += 1
        rest = rest[start:]
        if wrapper == "timeout" and rest and rest[0][:1].isdigit():
            rest = rest[1:]
        if wrapper == "watch" and rest:
            return ["sh", "-c", " ".join(rest)]  # watch runs its words as a sh -c line
        argv = rest
    return None


def _argv_risk(argv: list[str], depth: int = 0) -> str:
    unwrapped = _unwrap(list(argv))
    if unwrapped is None or depth > _MAX_DEPTH:
        return CRITICAL  # past what a person writes: judged as the worst it could be
    if not unwrapped:
        return LOW
    program, args = _program(unwrapped[0]), unwrapped[1:]
    if program == "eval":
        return highest([HIGH, _line_risk(" ".join(args), depth + 1)[1]])
    if program in _SHELLS:
        for index, arg in enumerate(args):
            if arg.startswith("-") and "c" in arg[1:] and index + 1 < len(args):
                return _line_risk(args[index + 1], depth + 1)[1]
        return HIGH  # an interactive or script shell: whatever it runs
    if program.startswith("mkfs") or program in CRITICAL_PROGRAMS:
        return CRITICAL
    if program == "find":
        return _find(args, depth)
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


def _find(args: Sequence[str], depth: int = 0) -> str:
    risk = CRITICAL if "-delete" in args else MEDIUM
    actions = [i for i, arg in enumerate(args) if arg in _FIND_ACTIONS]
    if len(actions) > MAX_FIND_ACTIONS:
        return CRITICAL  # each one is read to the next -exec: too many to read cheaply
    for index in actions:
        inner = [a for a in args[index + 1 :] if a not in (";", "\\;", "+")]
        end = next((i for i, a in enumerate(inner) if a in ("-exec", "-execdir")), len(inner))
        risk = highest([risk, _argv_risk(inner[:end], depth + 1), HIGH])
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
    "kill": _kill,
    "crontab": _crontab,
    "sed": _sed,
    "docker": _container,
    "podman": _container,
    "nerdctl": _container,
    "kubectl": _kubectl,
}


def _every_word_risk(line: str) -> str:
    """For text that is not parsed: any word that names a program counts, also once quotes
    and backslashes are taken out (``r''m`` is ``rm`` to the shell)."""
    lowered = line.lower()
    words = set(_WORD.findall(lowered))
    bare = lowered.translate(_UNQUOTE)
    if bare != lowered:
        words.update(_WORD.findall(bare))
    # A program that is critical only with some arguments (init 0, iptables -F…) counts as
    # critical here: we cannot tell which arguments are its own.
    critical = words & (CRITICAL_PROGRAMS | _SPECIAL.keys() | {"find"})
    if critical or any(word.startswith("mkfs") for word in words):
        return CRITICAL
    return HIGH  # no other program is rated above high


def _too_many_commands(line: str) -> bool:
    """Whether the line may hold more than :data:`MAX_COMMANDS` simple commands and
    substitutions (counted from the characters that can start one, quoted or not)."""
    return sum(line.count(ch) for ch in _COMMAND_STARTS) > MAX_COMMANDS


def _line_risk(line: str, depth: int = 0) -> tuple[str, str]:
    """The level and the risk of a shell line, from one parse of it."""
    if depth > _MAX_DEPTH:
        return REMEDIATE, CRITICAL
    try:
        outer, inner = split_substitutions(line)
        commands, writes, opaque = simple_commands(outer)
    except Unparseable:
        return REMEDIATE, _every_word_risk(line)
    subs = [_line_risk(sub, depth + 1) for sub in inner]
    if opaque or writes:
        level = REMEDIATE
    else:
        level = strongest([classify_argv(argv) for argv in commands] + [s[0] for s in subs])
    risks = [_LEVEL_FLOOR[level]]
    risks += [_argv_risk(argv, depth) for argv in commands]
    risks += [s[1] for s in subs]
    return level, highest(risks)


def shell_risk(line: str) -> str:
    """The risk of a ``/bin/sh -c`` command line: each simple command, as the words the shell
    gives it (a quoted ``sh -c 'ls; rm -rf /'`` stays one word), and each substitution. A line
    of more than :data:`MAX_COMMANDS` commands is judged by its words alone (at least high)."""
    if _too_many_commands(line):
        return _every_word_risk(line)
    return _line_risk(line)[1]


def classify_risk(command: str, args: Sequence[str] = (), *, shell: bool = False) -> str:
    """The risk tier of a command. Without ``shell`` it runs as argv, so only the program and
    its arguments count (shell syntax in them is inert)."""
    if shell:
        return shell_risk(" ".join([command, *(shlex.quote(a) for a in args)]))
    floor = _LEVEL_FLOOR[classify(command, args)]
    return highest([floor, _argv_risk([command, *args])])
