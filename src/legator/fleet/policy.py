# ruff: noqa: S604  (shell=True here classifies a line; nothing is executed)
"""The level classifier and policy evaluation, shared by the control plane and the probe.

Pure (stdlib only). A command is ``observe`` (reads state), ``diagnose`` (inspects more
deeply: logs, sockets, network probes) or ``remediate`` (changes something, or could). Shell
command lines are split on ``;``, ``&&``, ``||``, ``|``, ``&``, newlines and subshells; command
substitutions (``$( )``, backticks, ``<( )``) are classified on their own; a redirection that
writes a file is ``remediate``. A compound command is as strong as its strongest part; a line
that cannot be parsed, and any program this module does not know, is ``remediate``.

Hand-written on purpose: no maintained library classifies shell commands by effect; the
tokenising itself is done by ``shlex``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

OBSERVE, DIAGNOSE, REMEDIATE = "observe", "diagnose", "remediate"
_RANK = {OBSERVE: 0, DIAGNOSE: 1, REMEDIATE: 2}
_NAMES = (OBSERVE, DIAGNOSE, REMEDIATE)


def rank(level: str) -> int:
    try:
        return _RANK[level]
    except KeyError:
        raise ValueError(
            f"unknown level {level!r}: expected observe, diagnose or remediate"
        ) from None


def strongest(levels: Iterable[str]) -> str:
    return _NAMES[max((rank(level) for level in levels), default=0)]


def weakest(a: str, b: str) -> str:
    return _NAMES[min(rank(a), rank(b))]


OBSERVE_COMMANDS = frozenset(
    [
        "ls",
        "ll",
        "dir",
        "cat",
        "tac",
        "head",
        "tail",
        "less",
        "more",
        "df",
        "free",
        "uptime",
        "uname",
        "hostnamectl",
        "whoami",
        "id",
        "groups",
        "date",
        "pwd",
        "echo",
        "printf",
        "wc",
        "stat",
        "file",
        "which",
        "whereis",
        "type",
        "true",
        "false",
        "sort",
        "uniq",
        "cut",
        "tr",
        "nl",
        "column",
        "basename",
        "dirname",
        "realpath",
        "readlink",
        "lsblk",
        "lscpu",
        "lsusb",
        "lspci",
        "lsmod",
        "lsattr",
        "arch",
        "nproc",
        "getconf",
        "ps",
        "pgrep",
        "pstree",
        "w",
        "who",
        "last",
        "lastlog",
        "printenv",
        "locale",
        "tty",
        "users",
        "top",
        "htop",
        "uptime",
        "md5sum",
        "sha1sum",
        "sha256sum",
        "sha512sum",
        "cksum",
        "b2sum",
        "xxd",
        "od",
        "hexdump",
        "strings",
        "diff",
        "cmp",
        "comm",
        "grep",
        "egrep",
        "fgrep",
        "zgrep",
        "zcat",
        "bzcat",
        "xzcat",
        "jq",
        "yq",
        "test",
        "[",
        "sleep",
        "seq",
        "yes",
        "expr",
        "bc",
        "dc",
        "timedatectl",
        "localectl",
        "loginctl",
        "findmnt",
        "blkid",
        "du",
        "vmstat",
        "iostat",
        "mpstat",
        "free",
        "dmidecode",
    ]
)
DIAGNOSE_COMMANDS = frozenset(
    [
        "journalctl",
        "dmesg",
        "ss",
        "netstat",
        "lsof",
        "ping",
        "ping6",
        "traceroute",
        "tracepath",
        "mtr",
        "dig",
        "nslookup",
        "host",
        "whois",
        "arp",
        "route",
        "iftop",
        "nethogs",
        "iotop",
        "strace",
        "ltrace",
        "tcpdump",
        "sar",
        "pidstat",
        "perf",
        "ethtool",
        "getent",
        "nmap",
        "ncat",
        "openssl",
        "lslocks",
        "fuser",
        "numastat",
        "smartctl",
        "nvidia-smi",
        "sensors",
        "apt-cache",
        "apt-file",
        "dpkg-query",
        "rpm",
        "showmount",
        "resolvectl",
        "networkctl",
    ]
)
# Programs that run another command (their argument is classified).
WRAPPERS = frozenset({"nice", "nohup", "time", "timeout", "ionice", "stdbuf", "command", "builtin"})
SHELLS = frozenset(
    {
        "sh",
        "bash",
        "dash",
        "zsh",
        "ksh",
        "fish",
        "eval",
        "exec",
        "source",
        ".",
        "python",
        "python3",
        "perl",
        "ruby",
        "node",
        "php",
        "lua",
        "su",
        "sudo",
        "doas",
        "pkexec",
        "xargs",
        "env",
        "watch",
        "parallel",
        "ssh",
        "busybox",
    }
)
_SAFE_TARGETS = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})
_SYSTEMCTL_READ = frozenset(
    {
        "status",
        "show",
        "is-active",
        "is-enabled",
        "is-failed",
        "is-system-running",
        "list-units",
        "list-unit-files",
        "list-timers",
        "list-sockets",
        "list-jobs",
        "list-dependencies",
        "cat",
        "get-default",
        "help",
    }
)
_CONTAINER_READ = frozenset(
    {
        "ps",
        "logs",
        "inspect",
        "images",
        "stats",
        "top",
        "version",
        "info",
        "port",
        "diff",
        "events",
        "history",
        "search",
    }
)
_PACKAGE_READ = frozenset(
    {
        "list",
        "search",
        "show",
        "policy",
        "depends",
        "rdepends",
        "madison",
        "info",
        "history",
        "check-update",
        "repolist",
        "provides",
    }
)


class Unparseable(ValueError):
    pass


def _split_substitutions(line: str) -> tuple[str, list[str]]:
    """Replace ``$( )``, ``<( )``, ``>( )`` and backtick substitutions by a placeholder word,
    returning the outer line and the inner command lines; unquoted newlines become ``;``."""
    out: list[str] = []
    inner: list[str] = []
    i, n = 0, len(line)
    quote: str | None = None
    while i < n:
        ch = line[i]
        if quote == "'":
            out.append(ch)
            if ch == "'":
                quote = None
            i += 1
            continue
        if ch == "\\":
            if i + 1 >= n:
                raise Unparseable("line ends with a backslash")
            out.append(line[i : i + 2])
            i += 2
            continue
        if ch in "\"'" and quote is None:
            quote = ch
            out.append(ch)
            i += 1
            continue
        if ch == '"' and quote == '"':
            quote = None
            out.append(ch)
            i += 1
            continue
        if quote is None and ch == "\n":
            out.append(" ; ")
            i += 1
            continue
        if ch == "`":
            end = line.find("`", i + 1)
            if end < 0:
                raise Unparseable("unterminated backtick")
            inner.append(line[i + 1 : end])
            out.append(" __subst__ ")
            i = end + 1
            continue
        if ch in "$<>" and i + 1 < n and line[i + 1] == "(":
            if ch == "$" and i + 2 < n and line[i + 2] == "(":
                raise Unparseable("arithmetic expansion is not classified")
            depth, j = 1, i + 2
            while j < n and depth:
                if line[j] == "(":
                    depth += 1
                elif line[j] == ")":
                    depth -= 1
                j += 1
            if depth:
                raise Unparseable("unterminated command substitution")
            inner.append(line[i + 2 : j - 1])
            out.append(" __subst__ ")
            i = j
            continue
        out.append(ch)
        i += 1
    if quote is not None:
        raise Unparseable("unterminated quote")
    return "".join(out), inner


_OPERATORS = frozenset({";", "&&", "||", "|", "&", "|&", ";;", "(", ")", "{", "}", "!"})


def _simple_commands(line: str) -> tuple[list[list[str]], list[str], bool]:
    """Split a substitution-free line into simple commands (argv lists), the redirect targets
    that write, and whether a heredoc or other construct we do not follow appeared."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>(){}")
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise Unparseable(str(exc)) from None
    commands: list[list[str]] = [[]]
    writes: list[str] = []
    opaque = False
    it = iter(range(len(tokens)))
    for index in it:
        token = tokens[index]
        if token in _OPERATORS or (token and set(token) <= set(";&|(){}")):
            commands.append([])
            continue
        if token and set(token) <= set("<>&|"):
            if token.startswith("<<"):
                opaque = True
            target = tokens[index + 1] if index + 1 < len(tokens) else ""
            dup = token.endswith("&") and (target.isdigit() or target == "-")
            if ">" in token and not dup and target not in _SAFE_TARGETS:
                writes.append(target or "?")
            next(it, None)  # the target word
            continue
        commands[-1].append(token)
    return [c for c in commands if c], writes, opaque


def _program(argv: Sequence[str]) -> tuple[str, list[str]]:
    words = list(argv)
    while (
        words
        and "=" in words[0]
        and not words[0].startswith("=")
        and words[0].split("=", 1)[0].isidentifier()
    ):
        words.pop(0)  # VAR=value prefixes
    if not words:
        return "", []
    return os.path.basename(words[0]), words[1:]


def _has_flag(args: Sequence[str], *flags: str) -> bool:
    for arg in args:
        for flag in flags:
            if flag.startswith("--"):
                if arg == flag or arg.startswith(flag + "="):
                    return True
            elif arg == flag or (
                len(flag) == 2
                and arg.startswith("-")
                and not arg.startswith("--")
                and flag[1] in arg[1:]
            ):
                return True
    return False


def _first_positional(args: Sequence[str]) -> str:
    return next((a for a in args if not a.startswith("-")), "")


def classify_argv(argv: Sequence[str]) -> str:
    """The level of one program invocation (no shell interpretation)."""
    prog, args = _program(argv)
    if not prog:
        return OBSERVE
    if prog in SHELLS or prog.startswith("$") or prog == "__subst__":
        return REMEDIATE
    if prog in WRAPPERS:
        rest = list(args)
        while rest and (rest[0].startswith("-") or (prog == "timeout" and rest[0][:1].isdigit())):
            rest.pop(0)
        return strongest([DIAGNOSE if prog in {"ionice", "nice"} else OBSERVE, classify_argv(rest)])
    special = _SPECIAL.get(prog)
    if special is not None:
        return special(args)
    if prog in OBSERVE_COMMANDS:
        return OBSERVE
    if prog in DIAGNOSE_COMMANDS:
        return DIAGNOSE
    return REMEDIATE


def _find(args: list[str]) -> str:
    writes = {
        "-exec",
        "-execdir",
        "-ok",
        "-okdir",
        "-delete",
        "-fprint",
        "-fprint0",
        "-fprintf",
        "-fls",
    }
    return REMEDIATE if any(a in writes for a in args) else DIAGNOSE


def _curl(args: list[str]) -> str:
    if _has_flag(
        args,
        "-o",
        "-O",
        "-T",
        "-d",
        "-F",
        "-K",
        "--output",
        "--remote-name",
        "--remote-name-all",
        "--upload-file",
        "--data",
        "--data-binary",
        "--data-raw",
        "--data-urlencode",
        "--form",
        "--json",
        "--output-dir",
        "--create-dirs",
        "--config",
        "-c",
        "--cookie-jar",
        "-D",
        "--dump-header",
        "--trace",
        "--stderr",
    ):
        return REMEDIATE
    for i, arg in enumerate(args):
        if (
            arg in ("-X", "--request")
            and i + 1 < len(args)
            and args[i + 1].upper() not in ("GET", "HEAD")
        ):
            return REMEDIATE
        if arg.startswith("-X") and len(arg) > 2 and arg[2:].upper() not in ("GET", "HEAD"):
            return REMEDIATE
    return DIAGNOSE


def _wget(args: list[str]) -> str:
    if _has_flag(args, "--spider"):
        return DIAGNOSE
    for i, arg in enumerate(args):
        if arg in ("-O", "--output-document") and i + 1 < len(args) and args[i + 1] == "-":
            return (
                DIAGNOSE
                if not _has_flag(args, "--post-data", "--post-file", "-o", "-a")
                else REMEDIATE
            )
        if arg in ("-O-", "-qO-", "--output-document=-"):
            return DIAGNOSE
    return REMEDIATE


def _sed(args: list[str]) -> str:
    if _has_flag(args, "-i", "--in-place") or any(a.startswith("-i") for a in args):
        return REMEDIATE
    return DIAGNOSE  # a sed script can still write with w/W; kept above observe


def _awk(args: list[str]) -> str:
    program = " ".join(args)
    if any(marker in program for marker in ("system", ">", "|", "getline", "-i")):
        return REMEDIATE
    return DIAGNOSE


def _tee(args: list[str]) -> str:
    files = [a for a in args if not a.startswith("-")]
    return OBSERVE if all(f in _SAFE_TARGETS for f in files) else REMEDIATE


def _systemctl(args: list[str]) -> str:
    verb = _first_positional(args)
    return DIAGNOSE if verb in _SYSTEMCTL_READ or verb == "" else REMEDIATE


def _journalctl(args: list[str]) -> str:
    if _has_flag(
        args,
        "--vacuum-size",
        "--vacuum-time",
        "--vacuum-files",
        "--rotate",
        "--flush",
        "--sync",
        "--relinquish-var",
        "--setup-keys",
        "--update-catalog",
    ):
        return REMEDIATE
    return DIAGNOSE


def _container(args: list[str]) -> str:
    verb = _first_positional(args)
    if verb in ("container", "image", "volume", "network", "pod"):
        sub = _first_positional(args[args.index(verb) + 1 :])
        return DIAGNOSE if sub in ("ls", "list", "inspect", "ps") | _CONTAINER_READ else REMEDIATE
    return DIAGNOSE if verb in _CONTAINER_READ else REMEDIATE


def _kubectl(args: list[str]) -> str:
    verb = _first_positional(args)
    return (
        DIAGNOSE
        if verb
        in ("get", "describe", "logs", "top", "version", "explain", "api-resources", "cluster-info")
        else REMEDIATE
    )


def _ip(args: list[str]) -> str:
    words = [a for a in args if not a.startswith("-")]
    if len(words) <= 1 or words[1] in ("show", "list", "ls", "get", "lst", "sh"):
        return OBSERVE
    return REMEDIATE


def _package(args: list[str]) -> str:
    verb = _first_positional(args)
    return DIAGNOSE if verb in _PACKAGE_READ else REMEDIATE


def _dpkg(args: list[str]) -> str:
    reads = (
        "-l",
        "-L",
        "-s",
        "-S",
        "-p",
        "--list",
        "--listfiles",
        "--status",
        "--search",
        "--print-architecture",
        "--get-selections",
        "--verify",
        "-V",
    )
    return (
        DIAGNOSE
        if args and all(a in reads or not a.startswith("-") for a in args) and args[0] in reads
        else REMEDIATE
    )


def _rpm(args: list[str]) -> str:
    return (
        DIAGNOSE
        if (args and args[0].startswith("-q")) or _has_flag(args, "--query", "-V", "--verify")
        else REMEDIATE
    )


def _sysctl(args: list[str]) -> str:
    if _has_flag(args, "-w", "--write", "-p", "--load", "--system") or any("=" in a for a in args):
        return REMEDIATE
    return DIAGNOSE


def _date(args: list[str]) -> str:
    return (
        REMEDIATE
        if _has_flag(args, "-s", "--set") or any(not a.startswith(("+", "-")) for a in args)
        else OBSERVE
    )


def _hostname(args: list[str]) -> str:
    return (
        REMEDIATE
        if any(not a.startswith("-") for a in args) or _has_flag(args, "-F", "--file", "-b")
        else OBSERVE
    )


def _read_only_if(*flags: str, level: str = DIAGNOSE):  # type: ignore[no-untyped-def]
    def check(args: list[str]) -> str:
        return (
            level
            if args
            and all(a in flags for a in args if a.startswith("-"))
            and any(a in flags for a in args)
            else REMEDIATE
        )

    return check


def _mount(args: list[str]) -> str:
    return DIAGNOSE if not args or args in (["-l"], ["--list"]) else REMEDIATE


def _ufw(args: list[str]) -> str:
    return DIAGNOSE if _first_positional(args) in ("status", "show", "app") else REMEDIATE


def _sort(args: list[str]) -> str:
    return REMEDIATE if _has_flag(args, "-o", "--output") else OBSERVE


def _uniq(args: list[str]) -> str:
    # ``uniq INPUT OUTPUT`` writes OUTPUT.
    return REMEDIATE if len([a for a in args if not a.startswith("-")]) > 1 else OBSERVE


def _nft(args: list[str]) -> str:
    return (
        DIAGNOSE if _first_positional(args) in ("list", "-a") and "flush" not in args else REMEDIATE
    )


_SPECIAL = {
    "find": _find,
    "curl": _curl,
    "wget": _wget,
    "sed": _sed,
    "awk": _awk,
    "gawk": _awk,
    "mawk": _awk,
    "tee": _tee,
    "systemctl": _systemctl,
    "journalctl": _journalctl,
    "docker": _container,
    "podman": _container,
    "crictl": _container,
    "kubectl": _kubectl,
    "ip": _ip,
    "apt": _package,
    "apt-get": _package,
    "yum": _package,
    "dnf": _package,
    "zypper": _package,
    "apk": _package,
    "snap": _package,
    "dpkg": _dpkg,
    "rpm": _rpm,
    "sysctl": _sysctl,
    "date": _date,
    "hostname": _hostname,
    "iptables": _read_only_if(
        "-L", "-S", "--list", "--list-rules", "-n", "-v", "-t", "--line-numbers", "-x"
    ),
    "ip6tables": _read_only_if(
        "-L", "-S", "--list", "--list-rules", "-n", "-v", "-t", "--line-numbers", "-x"
    ),
    "nft": _nft,
    "mount": _mount,
    "ufw": _ufw,
    "sort": _sort,
    "uniq": _uniq,
}


def classify_shell(line: str) -> str:
    """The level of a shell command line (``/bin/sh -c`` semantics)."""
    try:
        outer, inner = _split_substitutions(line)
        commands, writes, opaque = _simple_commands(outer)
    except Unparseable:
        return REMEDIATE
    if opaque or writes:
        return REMEDIATE
    levels = [classify_argv(argv) for argv in commands]
    levels += [classify_shell(sub) for sub in inner]
    return strongest(levels)


def classify(command: str, args: Sequence[str] = (), *, shell: bool = False) -> str:
    """The level a command needs. Without ``shell`` it is executed as argv, so shell syntax
    in it has no effect and only the program and its arguments count."""
    if shell:
        return classify_shell(" ".join([command, *(shlex.quote(a) for a in args)]))
    return classify_argv([command, *args])


def command_parts(command: str, args: Sequence[str] = (), *, shell: bool = False) -> list[str]:
    """Each simple command as text, for allow/block prefix matching."""
    if not shell:
        return [" ".join([command, *args])]
    line = " ".join([command, *(shlex.quote(a) for a in args)])
    try:
        outer, inner = _split_substitutions(line)
        commands, _, _ = _simple_commands(outer)
    except Unparseable:
        return [line]
    parts = [" ".join(argv) for argv in commands]
    for sub in inner:
        parts += command_parts(sub, shell=True)
    return parts


@dataclass(frozen=True)
class Policy:
    level: str = OBSERVE
    allow: tuple[str, ...] = ()
    block: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        rank(self.level)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    required: str
    reason: str
    parts: list[str] = field(default_factory=list)


def _matches(part: str, prefix: str) -> bool:
    prefix = prefix.strip()
    return (
        part == prefix
        or part.startswith(prefix + " ")
        or (prefix.endswith(" ") and part.startswith(prefix))
    )


def evaluate(
    policy: Policy,
    command: str,
    args: Sequence[str] = (),
    *,
    shell: bool = False,
    requested: str | None = None,
) -> Decision:
    """Whether ``policy`` lets this command run. ``requested`` is a level the caller asked
    for explicitly; the command needs the stronger of it and its classification."""
    required = classify(command, args, shell=shell)
    if requested is not None:
        required = strongest([required, requested])
    parts = command_parts(command, args, shell=shell)
    for part in parts:
        for prefix in policy.block:
            if _matches(part, prefix):
                return Decision(
                    False, required, f"{part!r} matches blocked prefix {prefix!r}", parts
                )
    if policy.allow:
        for part in parts:
            if not any(_matches(part, prefix) for prefix in policy.allow):
                return Decision(False, required, f"{part!r} matches no allowed prefix", parts)
    if rank(required) > rank(policy.level):
        return Decision(
            False,
            required,
            f"command needs level {required}, policy allows up to {policy.level}",
            parts,
        )
    return Decision(True, required, f"level {required} within {policy.level}", parts)
