"""Whether a command can send something to another host: a request, a lookup, a probe.

Used by the gate to hold back what a model wrote (a prompt-injected one could send off what it
has read, with a command of a harmless level: ``curl``, ``nslookup``, ``ping`` of a name that
carries the data). Looks at every command a line runs, past wrappers and into ``sh -c``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from legator.fleet.policy.lexer import Unparseable
from legator.fleet.policy.unwrap import line_commands, unwrapped

# Programs whose every use may reach another host (a name given to them is looked up at least).
NETWORK_PROGRAMS = frozenset(
    {
        "curl",
        "wget",
        "ping",
        "ping6",
        "traceroute",
        "traceroute6",
        "tracepath",
        "tracepath6",
        "mtr",
        "dig",
        "nslookup",
        "host",
        "drill",
        "whois",
        "nmap",
        "nc",
        "ncat",
        "netcat",
        "socat",
        "telnet",
        "openssl",
        "getent",
        "resolvectl",
        "showmount",
        "arping",
        "ssh",
        "scp",
        "sftp",
        "rsync",
        "ftp",
        "git",
        "snap",
        "apt-file",
    }
)
# Container tools reach a registry only for these.
_REGISTRY_VERBS = frozenset({"search", "pull", "push", "login"})


# Programs that connect to another host when given an option: its short letter and the long
# names (any prefix of three letters or more counts, as getopt_long reads abbreviations).
_SYSTEMD_REMOTE = ("H", ("host",))
_REMOTE_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "systemctl": _SYSTEMD_REMOTE,
    "hostnamectl": _SYSTEMD_REMOTE,
    "timedatectl": _SYSTEMD_REMOTE,
    "localectl": _SYSTEMD_REMOTE,
    "loginctl": _SYSTEMD_REMOTE,
    "docker": ("H", ("host",)),
    "podman": ("H", ("url", "host")),
}


def _names_remote(arg: str, program: str) -> bool:
    letter, longs = _REMOTE_OPTIONS[program]
    if arg.startswith("--"):
        given = arg[2:].split("=", 1)[0]
        return any(name.startswith(given) for name in longs) and len(given) >= 2
    return arg.startswith("-") and letter in arg[1:]


def _reaches(argv: Sequence[str]) -> bool:
    program, args = argv[0], argv[1:]
    if program in NETWORK_PROGRAMS:
        return True
    if program in _REMOTE_OPTIONS and any(_names_remote(arg, program) for arg in args):
        return True  # systemctl -H host, docker -H tcp://…, podman --url ssh://…
    if program in ("docker", "podman", "nerdctl", "crictl"):
        return any(arg in _REGISTRY_VERBS for arg in args)
    if program == "kubectl":  # its own cluster is the operator's; another server is not
        return any(arg in ("-s", "--server") or arg.startswith("--server=") for arg in args)
    if program == "rpm" and any("://" in arg for arg in args):
        return True  # rpm -qp fetches a package by URL
    return any("/dev/tcp/" in arg or "/dev/udp/" in arg for arg in args)


def reaches_network(command: str, args: Sequence[str] = (), *, shell: bool = False) -> bool:
    """Whether running this may send anything to another host."""
    try:
        if shell:
            line = " ".join([command, *(shlex.quote(a) for a in args)])
            if "/dev/tcp/" in line or "/dev/udp/" in line:
                return True
            commands = line_commands(line)
        else:
            commands = unwrapped([command, *args])
    except Unparseable:
        return True  # what cannot be read may reach anything
    return any(_reaches(argv) for argv in commands if argv)
