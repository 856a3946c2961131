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

import functools
import itertools
import os
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
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


def _program(argv: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """The program's basename, its arguments, and the variables a ``VAR=value`` prefix sets."""
    words = list(argv)
    assigned: list[str] = []
    while words and _is_assignment(words[0]):
        assigned.append(words.pop(0).split("=", 1)[0])
    if not words:
        return "", [], assigned
    return os.path.basename(words[0]), words[1:], assigned


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
    prog, args, assigned = _program(argv)
    if classify_env(assigned) == REMEDIATE:
        return REMEDIATE  # PATH=…, LD_PRELOAD=…, LESSOPEN=… change what runs
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


# ---- environment ------------------------------------------------------------------------

# Variables that only choose a language, time zone, terminal size or colours. Any other
# variable can change what a program runs or writes (PATH, LD_PRELOAD, LESSOPEN, PAGER,
# BASH_ENV, PYTHONSTARTUP, GIT_*, KUBECONFIG, …), so setting it is ``remediate``.
SAFE_ENV = frozenset({"LANG", "LANGUAGE", "TZ", "COLUMNS", "LINES", "TERM", "NO_COLOR"})


def env_is_safe(name: str) -> bool:
    return name in SAFE_ENV or name.startswith("LC_")


def classify_env(names: Iterable[str]) -> str:
    """The level needed to run a command with these environment variables set."""
    return OBSERVE if all(env_is_safe(name) for name in names) else REMEDIATE


def _is_assignment(word: str) -> bool:
    name, equals, _ = word.partition("=")
    return bool(equals) and name.isidentifier()


# ---- options, read as getopt_long does ---------------------------------------------------


@dataclass(frozen=True)
class _Syntax:
    """A program's options. ``short_flags`` None: any letter not listed takes no value."""

    short_values: str = ""
    short_optional: str = ""  # letters whose value, if any, is attached (``-i.bak``)
    short_flags: str | None = None
    long_values: frozenset[str] = frozenset()
    long_flags: frozenset[str] = frozenset()
    stop_at_word: bool = False  # options end at the first word ("+" in the optstring)


@dataclass(frozen=True)
class _Opt:
    name: str  # "-o", "--output" (the full name), or the text given when unknown
    value: str | None
    sure: bool  # known, and spelled in full


@dataclass
class _Parsed:
    items: list[_Opt | str]

    @property
    def words(self) -> list[str]:
        return [item for item in self.items if isinstance(item, str)]

    @property
    def options(self) -> list[_Opt]:
        return [item for item in self.items if isinstance(item, _Opt)]

    def has(self, *names: str) -> bool:
        return any(option.name in names for option in self.options)

    def values(self, *names: str) -> list[str | None]:
        return [option.value for option in self.options if option.name in names]

    def unsure_before_word(self, skip: int = 0) -> bool:
        """An unknown or abbreviated option before the ``skip``-th word (the verb): it may
        have taken the next word as its value, so the verb is not known for sure."""
        seen = 0
        for item in self.items:
            if isinstance(item, str):
                if seen == skip:
                    return False
                seen += 1
            elif not item.sure:
                return True
        return False


def _long_names(given: str, known: Iterable[str]) -> list[str]:
    """The long options ``--given`` selects: itself when known, else every known option it
    abbreviates (getopt_long accepts any unambiguous prefix; an ambiguous one is taken to
    mean all of its candidates, so a check errs on the strong side)."""
    names = set(known)
    if given in names:
        return [given]
    return sorted(name for name in names if name.startswith(given)) if given else []


def _parse(args: Sequence[str], syntax: _Syntax) -> _Parsed:
    items: list[_Opt | str] = []
    known_long = syntax.long_values | syntax.long_flags
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            items += args[i:]
            break
        if arg == "-" or not arg.startswith("-"):
            items.append(arg)
            if syntax.stop_at_word:
                items += args[i:]
                break
            continue
        if arg.startswith("--"):
            given, equals, value = arg[2:].partition("=")
            names = _long_names(given, known_long)
            if names == [given]:
                takes = given in syntax.long_values
                if takes and not equals and i < len(args):
                    value, equals = args[i], "="
                    i += 1
                items.append(_Opt("--" + given, value if equals else None, True))
            elif names:
                items += [_Opt("--" + name, value if equals else None, False) for name in names]
            else:
                items.append(_Opt("--" + given, value if equals else None, False))
            continue
        for j in range(1, len(arg)):
            letter = arg[j]
            rest = arg[j + 1 :]
            if letter in syntax.short_values:
                if not rest and i < len(args):
                    rest = args[i]
                    i += 1
                items.append(_Opt("-" + letter, rest, True))
                break
            if letter in syntax.short_optional:
                items.append(_Opt("-" + letter, rest or None, True))
                break
            sure = syntax.short_flags is None or letter in syntax.short_flags
            items.append(_Opt("-" + letter, None, sure))
    return _Parsed(items)


def _names(words: str) -> frozenset[str]:
    return frozenset(words.split())


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


_CURL = _Syntax(
    short_values="AbCcDdEeFHKmoPQrTtuUwXxYyz",
    long_values=_names(
        "output output-dir upload-file data data-ascii data-binary data-raw data-urlencode "
        "form form-string json config cookie-jar dump-header trace trace-ascii stderr "
        "libcurl etag-save hsts alt-svc engine quote request write-out user-agent header "
        "cookie user proxy referer max-time connect-timeout cacert cert key resolve "
        "connect-to url range retry unix-socket abstract-unix-socket proxy-user interface "
        "max-filesize limit-rate continue-at ssl-sessions variable expand-data "
        "expand-output expand-url"
    ),
    long_flags=_names(
        "remote-name remote-name-all create-dirs silent show-error location insecure fail "
        "include head get verbose compressed remote-time remote-header-name trace-time"
    ),
)
# Options that write a file, send data, run something or read a config that may do so.
_CURL_WRITES = frozenset(
    "--" + name
    for name in (
        "output", "output-dir", "remote-name", "remote-name-all", "create-dirs", "upload-file",
        "data", "data-ascii", "data-binary", "data-raw", "data-urlencode", "form",
        "form-string", "json", "config", "cookie-jar", "dump-header", "trace", "trace-ascii",
        "stderr", "libcurl", "etag-save", "hsts", "alt-svc", "engine", "quote",
        "ssl-sessions", "expand-data", "expand-output",
    )
) | {"-o", "-O", "-T", "-d", "-F", "-K", "-c", "-D", "-Q"}  # fmt: skip
_CURL_SCHEMES = ("gopher:", "gophers:", "dict:", "telnet:", "smtp:", "smtps:", "ldap:", "mqtt:")


def _curl(args: list[str]) -> str:
    parsed = _parse(args, _CURL)
    if parsed.has(*_CURL_WRITES):
        return REMEDIATE
    if any(v is None or v.upper() not in ("GET", "HEAD") for v in parsed.values("-X", "--request")):
        return REMEDIATE
    if any(v is None or "%output{" in v for v in parsed.values("-w", "--write-out")):
        return REMEDIATE  # --write-out '%output{file}' writes a file
    if any(word.lower().startswith(_CURL_SCHEMES) for word in parsed.words):
        return REMEDIATE  # raw protocols can send anything to any service
    return DIAGNOSE


_WGET = _Syntax(
    short_values="aABDeIilnOoPQRtTUwX",
    long_values=_names(
        "output-document output-file append-output directory-prefix execute config "
        "post-data post-file body-data body-file method save-cookies warc-file rejected-log "
        "use-askpass hsts-file input-file tries timeout user-agent header user password "
        "level wait quota"
    ),
    long_flags=_names(
        "spider quiet no-verbose verbose recursive mirror page-requisites convert-links "
        "backup-converted background server-response no-check-certificate continue "
        "timestamping"
    ),
)
_WGET_WRITES = frozenset(
    "--" + name
    for name in (
        "output-file", "append-output", "directory-prefix", "execute", "config", "post-data",
        "post-file", "body-data", "body-file", "save-cookies", "warc-file", "rejected-log",
        "use-askpass", "hsts-file", "recursive", "mirror", "page-requisites", "convert-links",
        "backup-converted", "background",
    )
) | {"-o", "-a", "-P", "-e", "-r", "-m", "-p", "-k", "-K", "-b"}  # fmt: skip


def _wget(args: list[str]) -> str:
    parsed = _parse(args, _WGET)
    if parsed.has(*_WGET_WRITES):
        return REMEDIATE
    if any(v is None or v.upper() not in ("GET", "HEAD") for v in parsed.values("--method")):
        return REMEDIATE
    documents = parsed.values("-O", "--output-document")
    if documents:  # the last one wins; "-" is standard output
        return DIAGNOSE if documents[-1] == "-" else REMEDIATE
    return DIAGNOSE if parsed.has("--spider") else REMEDIATE  # by default it saves a file


_SED = _Syntax(
    short_values="efl",
    short_optional="i",
    long_values=_names("expression file line-length"),
    long_flags=_names(
        "in-place quiet silent debug follow-symlinks posix regexp-extended separate sandbox "
        "unbuffered null-data zero-terminated help version"
    ),
)
_SED_SIMPLE = frozenset("=dDgGhHnNpPxzF")


def _sed_script_is_safe(script: str) -> bool:
    """Whether a sed script neither runs (``e``, ``s///e``) nor writes (``w``, ``W``,
    ``s///w``) anything; a script this reader does not follow counts as unsafe."""
    i, n = 0, len(script)

    def skip_regex(start: int, delim: str) -> int:
        j = start
        while j < n and script[j] != delim:
            if script[j] == "\\":
                j += 1
            elif script[j] == "\n":
                raise Unparseable("newline in a regex")
            j += 1
        if j >= n:
            raise Unparseable("unterminated regex")
        return j + 1

    def skip_address(j: int) -> int:
        if j < n and script[j] == "/":
            return skip_regex(j + 1, "/")
        if j + 1 < n and script[j] == "\\":
            return skip_regex(j + 2, script[j + 1])
        while j < n and (script[j].isdigit() or script[j] in "$~+"):
            j += 1
        return j

    def to_line_end(j: int) -> int:
        end = script.find("\n", j)
        return n if end < 0 else end

    try:
        while i < n:
            while i < n and script[i] in " \t\n;{}!":
                i += 1
            if i >= n:
                break
            i = skip_address(i)
            if i < n and script[i] == ",":
                i = skip_address(i + 1)
            while i < n and script[i] in " \t!":
                i += 1
            if i >= n:
                break
            cmd = script[i]
            i += 1
            if cmd in "{}":
                continue
            if cmd in "ewW":
                return False
            if cmd in _SED_SIMPLE:
                continue
            if cmd in "#:aicrRbtTv":  # text, label, comment or file read to the line's end
                end = to_line_end(i)
                if cmd in "btT:v":  # labels also end at ";"
                    semi = script.find(";", i, end)
                    end = end if semi < 0 else semi
                i = end
                continue
            if cmd in "lLqQ":
                while i < n and (script[i].isdigit() or script[i] in " \t"):
                    i += 1
                continue
            if cmd in "sy":
                if i >= n or script[i] in "\\\n":
                    return False
                delim = script[i]
                i = skip_regex(skip_regex(i + 1, delim), delim)
                if cmd == "s":
                    while i < n and (script[i].isalnum()):
                        if script[i] in "ewW":
                            return False  # s///e runs the pattern space, s///w writes
                        i += 1
                continue
            return False
    except Unparseable:
        return False
    return True


def _sed(args: list[str]) -> str:
    parsed = _parse(args, _SED)
    if parsed.has("-i", "--in-place") or not all(o.sure for o in parsed.options):
        return REMEDIATE
    if parsed.has("-f", "--file"):
        return REMEDIATE  # a script we cannot read
    scripts = [v or "" for v in parsed.values("-e", "--expression")]
    if not scripts:
        scripts = parsed.words[:1]
    if not parsed.has("--sandbox") and not all(_sed_script_is_safe(s) for s in scripts):
        return REMEDIATE
    return DIAGNOSE


_AWK = _Syntax(
    short_values="Fvef",
    long_values=_names("field-separator assign source file"),
    long_flags=_names("sandbox posix traditional characters-as-bytes bignum"),
    stop_at_word=True,
)
_AWK_SAFE_OPTIONS = frozenset(
    {"-F", "-v", "-e", "--field-separator", "--assign", "--source", "--sandbox", "-S",
     "--posix", "-P", "--traditional", "-c", "--characters-as-bytes", "-b", "--bignum", "-M"}
)  # fmt: skip
# Indirect calls (@f()), @include/@load, system(), pipes, redirections, getline.
_AWK_MARKERS = ("system", ">", "|", "getline", "@")


def _awk(args: list[str]) -> str:
    parsed = _parse(args, _AWK)
    if any(not o.sure or o.name not in _AWK_SAFE_OPTIONS for o in parsed.options):
        return REMEDIATE  # -f/-E program files, -l/--load, -i, --dump-variables, --profile…
    programs = [v or "" for v in parsed.values("-e", "--source")]
    if not programs:
        programs = parsed.words[:1]
    if any(marker in program for program in programs for marker in _AWK_MARKERS):
        return REMEDIATE
    return DIAGNOSE


def _tee(args: list[str]) -> str:
    files = [a for a in args if not a.startswith("-")]
    return OBSERVE if all(f in _SAFE_TARGETS for f in files) else REMEDIATE


def _verb(parsed: _Parsed, index: int = 0) -> str | None:
    """The ``index``-th word (a verb), or None when an option before it leaves it unsure."""
    if parsed.unsure_before_word(index):
        return None
    words = parsed.words
    return words[index] if index < len(words) else ""


_SYSTEMCTL = _Syntax(
    short_values="tpPsHMnoC",
    short_flags="ahlqrfiT",
    long_values=_names(
        "type property state signal kill-whom kill-value host machine lines output job-mode "
        "root image image-policy preset-mode boot-loader-menu boot-loader-entry "
        "reboot-argument timestamp what check-inhibitors message when drop-in legend "
        "capsule"
    ),
    long_flags=_names(
        "all recursive reverse after before with-dependencies full value show-types fail "
        "irreversible ignore-dependencies ignore-inhibitors dry-run quiet no-warn no-block "
        "wait user system global no-wall no-reload no-ask-password runtime force now plain "
        "failed firmware-setup read-only mkdir marked no-pager no-legend help version "
        "show-transaction"
    ),
)


def _systemctl(args: list[str]) -> str:
    verb = _verb(_parse(args, _SYSTEMCTL))
    return DIAGNOSE if verb == "" or verb in _SYSTEMCTL_READ else REMEDIATE


_JOURNALCTL = _Syntax(  # short options are all read as flags: none of them writes
    long_values=_names("cursor-file vacuum-size vacuum-time vacuum-files"),
    long_flags=_names(
        "rotate flush sync relinquish-var smart-relinquish-var setup-keys update-catalog "
        "reverse root utc"
    ),
)
_JOURNALCTL_WRITES = frozenset(
    {"--vacuum-size", "--vacuum-time", "--vacuum-files", "--rotate", "--flush", "--sync",
     "--relinquish-var", "--smart-relinquish-var", "--setup-keys", "--update-catalog",
     "--cursor-file"}
)  # fmt: skip


def _journalctl(args: list[str]) -> str:
    return REMEDIATE if _parse(args, _JOURNALCTL).has(*_JOURNALCTL_WRITES) else DIAGNOSE


_DOCKER = _Syntax(
    short_values="cHl",
    short_flags="Dvh",
    long_values=_names("config context host log-level tlscacert tlscert tlskey"),
    long_flags=_names("debug tls tlsverify version help"),
    stop_at_word=True,
)
# Podman's other global options point it at other runtimes, hooks, storage or output files.
_PODMAN = _Syntax(
    short_values="c",
    short_flags="rvh",
    long_values=_names("connection url identity log-level"),
    long_flags=_names("remote version help noout"),
    stop_at_word=True,
)
_CRICTL = _Syntax(
    short_values="rict",
    short_flags="Dvh",
    long_values=_names("runtime-endpoint image-endpoint config timeout"),
    long_flags=_names("debug version help"),
    stop_at_word=True,
)
_CONTAINER_SYNTAX = {"docker": _DOCKER, "podman": _PODMAN, "crictl": _CRICTL}
_SUBCOMMAND_ARGS = _Syntax(short_flags="", stop_at_word=True)  # no option before a sub-verb


def _container(program: str, args: list[str]) -> str:
    parsed = _parse(args, _CONTAINER_SYNTAX[program])
    verb = _verb(parsed)
    if verb in ("container", "image", "volume", "network", "pod", "system"):
        sub = _verb(_parse(parsed.words[1:], _SUBCOMMAND_ARGS))
        reads = {"ls", "list", "inspect", "ps", "df", "info"} | _CONTAINER_READ
        return DIAGNOSE if sub in reads else REMEDIATE
    return DIAGNOSE if verb in _CONTAINER_READ else REMEDIATE


_KUBECTL = _Syntax(
    short_values="nsvolc",
    short_flags="Ah",
    long_values=_names(
        "namespace context cluster user server as as-group as-uid certificate-authority "
        "client-certificate client-key password username request-timeout tls-server-name "
        "token v vmodule log-flush-frequency output selector kubeconfig cache-dir profile "
        "profile-output log-file log-dir output-directory"
    ),
    long_flags=_names(
        "insecure-skip-tls-verify match-server-version warnings-as-errors "
        "disable-compression help all-namespaces"
    ),
)
# A kubeconfig can name credential plugins (commands); the others write files.
_KUBECTL_DANGEROUS = frozenset(
    {"--kubeconfig", "--cache-dir", "--profile", "--profile-output", "--log-file", "--log-dir",
     "--output-directory"}
)  # fmt: skip
_KUBECTL_READ = frozenset(
    {"get", "describe", "logs", "top", "version", "explain", "api-resources", "api-versions",
     "cluster-info"}
)  # fmt: skip


def _kubectl(args: list[str]) -> str:
    parsed = _parse(args, _KUBECTL)
    if parsed.has(*_KUBECTL_DANGEROUS):
        return REMEDIATE
    return DIAGNOSE if _verb(parsed) in _KUBECTL_READ else REMEDIATE


# ip reads its options in this order, each matched by any prefix ("-b" is -batch, "-br"
# -brief, "-f" -family); True: takes a value, None: runs commands from a file or forces.
_IP_OPTIONS: tuple[tuple[str, bool | None], ...] = (
    ("-loops", True), ("-family", True), ("-4", False), ("-6", False), ("-0", False),
    ("-M", False), ("-B", False), ("-stats", False), ("-statistics", False),
    ("-details", False), ("-resolve", False), ("-oneline", False), ("-timestamp", False),
    ("-tshort", False), ("-Version", False), ("-force", None), ("-batch", None),
    ("-brief", False), ("-json", False), ("-pretty", False), ("-rcvbuf", True),
    ("-color", False), ("-help", False), ("-human", False), ("-iec", False),
    ("-netns", True), ("-Numeric", False), ("-all", False), ("-echo", False),
)  # fmt: skip


def _ip(args: list[str]) -> str:
    rest = list(args)
    while rest and rest[0].startswith("-") and rest[0] != "-":
        option = rest.pop(0)
        if option == "--":
            break
        option = (option[1:] if option.startswith("--") else option).split("=", 1)[0]
        match = next((takes for name, takes in _IP_OPTIONS if name.startswith(option)), False)
        if match is None or len(option) < 2:
            return REMEDIATE
        if match and rest:
            rest.pop(0)
        if not any(name.startswith(option) for name, _ in _IP_OPTIONS):
            return REMEDIATE
    words = [a for a in rest if not a.startswith("-")]
    if len(words) <= 1 or words[1] in ("show", "list", "ls", "get", "lst", "sh"):
        return OBSERVE
    return REMEDIATE


def _tracer(
    syntax: _Syntax, attach: frozenset[str], writes: frozenset[str]
) -> Callable[[list[str]], str]:
    """strace, ltrace, perf stat/trace: diagnose only when attaching to running processes
    (``-p PID``) without a command of their own to run and without writing a file."""

    def check(args: list[str]) -> str:
        parsed = _parse(args, syntax)
        if parsed.words or parsed.has(*writes) or not parsed.has(*attach):
            return REMEDIATE
        if any("inject" in v or "fault" in v for v in parsed.values("-e") if v):
            return REMEDIATE  # fault injection changes what the traced process does
        return DIAGNOSE

    return check


_STRACE = _Syntax(
    short_values="abeEIoOpPsSuUX",
    long_values=_names(
        "attach output env user trace signal abbrev verbose raw read write string-limit "
        "columns summary-sort-by trace-path detach-on status quiet decode-fds silence"
    ),
    long_flags=_names("follow-forks output-separately summary summary-only"),
)
_STRACE_WRITES = frozenset(
    {"-o", "--output", "-E", "--env", "-u", "--user", "--inject", "--fault", "--kill-on-exit",
     "--daemonize", "-D"}
)  # fmt: skip
_LTRACE = _Syntax(
    short_values="aAeFlLnoOpsuwxX",
    long_values=_names("output library config user indent align"),
)
_PERF_TRACE = _Syntax(
    short_values="eptCGoIrxMDjFcmu",
    long_values=_names("pid tid output event cpu interval-print objdump"),
    long_flags=_names("all-cpus append"),
)
_PERF_WRITES = frozenset({"-o", "--output", "--objdump", "--append"})
_TRACERS = {
    "strace": _tracer(_STRACE, frozenset({"-p", "--attach"}), _STRACE_WRITES),
    "ltrace": _tracer(_LTRACE, frozenset({"-p"}), frozenset({"-o", "--output", "-u", "--user"})),
}
_PERF_RUN = _tracer(
    _PERF_TRACE, frozenset({"-p", "--pid", "-t", "--tid", "-a", "--all-cpus"}), _PERF_WRITES
)


def _perf(args: list[str]) -> str:
    verb = args[0] if args else ""
    if verb in ("list", "version", "help", "--version", "--help", "-v", "-h"):
        return DIAGNOSE
    if verb in ("stat", "trace", "top"):
        rest = args[1:]
        if verb == "top":
            rest = [*rest, "-a"]  # top watches the whole system; it runs nothing
        return _PERF_RUN(rest)
    return REMEDIATE  # record writes perf.data; script, report and the rest run helpers


def _xxd(args: list[str]) -> str:
    """``xxd -r`` turns a dump back into bytes and writes them; a second file name is an
    output file. xxd matches options by their first letters, with one or two dashes."""
    files: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "-" or not arg.startswith("-"):
            files.append(arg)
            continue
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if name.startswith("r"):
            return REMEDIATE
        takes_value = name in ("c", "g", "l", "s", "o", "n", "R", "cols", "groupsize", "len")
        if (takes_value or name in ("seek", "offset", "name")) and rest:
            rest.pop(0)
    return REMEDIATE if len(files) > 1 and files[1] not in ("-", *_SAFE_TARGETS) else OBSERVE


_SORT = _Syntax(
    short_values="koSTt",
    long_values=_names(
        "output compress-program key buffer-size field-separator temporary-directory "
        "batch-size files0-from random-source sort parallel"
    ),
    long_flags=_names(
        "check ignore-leading-blanks dictionary-order ignore-case general-numeric-sort "
        "ignore-nonprinting month-sort human-numeric-sort numeric-sort random-sort reverse "
        "version-sort debug merge stable unique zero-terminated help version"
    ),
)


def _sort(args: list[str]) -> str:
    writes = _parse(args, _SORT).has("-o", "--output", "--compress-program")
    return REMEDIATE if writes else OBSERVE


_DATE = _Syntax(
    short_values="dfrs",
    short_optional="I",
    long_values=_names("date file reference set rfc-3339 resolution"),
    long_flags=_names("debug iso-8601 rfc-email universal utc uct help version"),
)


def _date(args: list[str]) -> str:
    parsed = _parse(args, _DATE)
    if parsed.has("-s", "--set") or any(not word.startswith("+") for word in parsed.words):
        return REMEDIATE  # date MMDDhhmm sets the clock too
    return OBSERVE


def _hostname(args: list[str]) -> str:
    return (
        REMEDIATE
        if any(not a.startswith("-") for a in args) or _has_flag(args, "-F", "--file", "-b")
        else OBSERVE
    )


_CTL_OPTIONS = _Syntax(
    short_values="HMp",
    short_flags="ahql",
    long_values=_names("host machine property json output"),
    long_flags=_names(
        "static transient pretty no-ask-password help version all value no-pager no-legend "
        "full monitor adjust-system-clock"
    ),
)


def _ctl(reads: frozenset[str], level: str = OBSERVE) -> Callable[[list[str]], str]:
    """hostnamectl, timedatectl, localectl, loginctl…: reading verbs only; any other verb
    (``set-*``, ``kill-*``…) changes the system."""

    def check(args: list[str]) -> str:
        verb = _verb(_parse(args, _CTL_OPTIONS))
        return (
            level
            if verb is not None and (verb == "" or verb in reads or verb.startswith("list-"))
            else REMEDIATE
        )

    return check


_FUSER = _Syntax(short_values="n", long_values=_names("namespace"), long_flags=_names("kill"))


def _fuser(args: list[str]) -> str:
    return REMEDIATE if _parse(args, _FUSER).has("-k", "--kill") else DIAGNOSE


_YQ = _Syntax(
    long_values=_names("split-exp output-format input-format expression"),
    long_flags=_names("inplace in-place"),
)


def _yq(args: list[str]) -> str:
    writes = _parse(args, _YQ).has("-i", "-s", "--inplace", "--in-place", "--split-exp")
    return REMEDIATE if writes else OBSERVE


_LESS = _Syntax(
    short_values="bhjkoOpPtTxyz",
    long_values=_names("log-file LOG-FILE lesskey-file lesskey-src lesskey-content"),
)
_LESS_WRITES = frozenset(
    {"-o", "-O", "-k", "--log-file", "--LOG-FILE", "--lesskey-file", "--lesskey-src",
     "--lesskey-content"}
)  # fmt: skip


def _less(args: list[str]) -> str:
    parsed = _parse(args, _LESS)
    # +cmd runs a less command at start; only searching and moving are let through.
    starts = [w[1:] for w in parsed.words if w.startswith("+")]
    if parsed.has(*_LESS_WRITES) or any(
        not (s[:1] in ("", "/", "G", "g", "F") or s.isdigit()) for s in starts
    ):
        return REMEDIATE
    return OBSERVE


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


def _uniq(args: list[str]) -> str:
    # ``uniq INPUT OUTPUT`` writes OUTPUT.
    return REMEDIATE if len([a for a in args if not a.startswith("-")]) > 1 else OBSERVE


def _nft(args: list[str]) -> str:
    return (
        DIAGNOSE if _first_positional(args) in ("list", "-a") and "flush" not in args else REMEDIATE
    )


_READ_ONLY_TABLES = (
    "-L", "-S", "--list", "--list-rules", "-n", "-v", "-t", "--line-numbers", "-x"
)  # fmt: skip
_SPECIAL: dict[str, Callable[[list[str]], str]] = {
    "find": _find,
    "curl": _curl,
    "wget": _wget,
    "sed": _sed,
    "awk": _awk,
    "gawk": _awk,
    "mawk": _awk,
    "nawk": _awk,
    "tee": _tee,
    "systemctl": _systemctl,
    "journalctl": _journalctl,
    "docker": functools.partial(_container, "docker"),
    "podman": functools.partial(_container, "podman"),
    "crictl": functools.partial(_container, "crictl"),
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
    "hostnamectl": _ctl(frozenset({"status", "show"})),
    "timedatectl": _ctl(frozenset({"status", "show", "show-timesync", "timesync-status"})),
    "localectl": _ctl(frozenset({"status"})),
    "loginctl": _ctl(
        frozenset(
            {
                "session-status",
                "show-session",
                "user-status",
                "show-user",
                "seat-status",
                "show-seat",
            }
        )
    ),
    "resolvectl": _ctl(
        frozenset(
            {
                "query",
                "status",
                "statistics",
                "service",
                "openpgp",
                "tlsa",
                "show-cache",
                "show-server-state",
                "monitor",
            }
        ),
        DIAGNOSE,
    ),
    "networkctl": _ctl(frozenset({"list", "status", "lldp", "label"}), DIAGNOSE),
    "iptables": _read_only_if(*_READ_ONLY_TABLES),
    "ip6tables": _read_only_if(*_READ_ONLY_TABLES),
    "nft": _nft,
    "mount": _mount,
    "ufw": _ufw,
    "sort": _sort,
    "uniq": _uniq,
    "xxd": _xxd,
    "strace": _TRACERS["strace"],
    "ltrace": _TRACERS["ltrace"],
    "perf": _perf,
    "fuser": _fuser,
    "yq": _yq,
    "less": _less,
}

# ---- the block list: programs and words, past wrappers ---------------------------------

_WRAPPER_SYNTAX = {
    "command": _Syntax(stop_at_word=True),
    "builtin": _Syntax(stop_at_word=True),
    "exec": _Syntax(short_values="a", stop_at_word=True),
    "nohup": _Syntax(stop_at_word=True),
    "busybox": _Syntax(stop_at_word=True),
    "nice": _Syntax(short_values="n", long_values=_names("adjustment"), stop_at_word=True),
    "sudo": _Syntax(
        short_values="CDgpRrtTUu",
        long_values=_names(
            "close-from chdir group prompt chroot role type command-timeout other-user user host"
        ),
        stop_at_word=True,
    ),
    "doas": _Syntax(short_values="uC", stop_at_word=True),
    "timeout": _Syntax(
        short_values="sk", long_values=_names("signal kill-after"), stop_at_word=True
    ),
    "stdbuf": _Syntax(
        short_values="ioe", long_values=_names("input output error"), stop_at_word=True
    ),
    "time": _Syntax(short_values="fo", long_values=_names("format output"), stop_at_word=True),
    "ionice": _Syntax(short_values="cnpPu", stop_at_word=True),
    "env": _Syntax(
        short_values="uCS",
        long_values=_names("unset chdir split-string"),
        stop_at_word=True,
    ),
    "xargs": _Syntax(short_values="aEdIsnLP", short_optional="eil", stop_at_word=True),
}
_SHELL_C = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "su"})


def _unwrapped(argv: Sequence[str], depth: int = 0) -> list[list[str]]:
    """The commands an argv runs, each as ``[program basename, *args]``: past assignments
    and wrappers (``sudo``, ``env``, ``timeout 5``…), into ``sh -c`` strings, ``eval`` and
    ``find -exec``. Used to match the ``block`` list, not to classify."""
    words = list(argv)
    while words and _is_assignment(words[0]):
        words.pop(0)
    if not words or depth > 8:
        return []
    program, args = os.path.basename(words[0]), words[1:]
    found = [[program, *args]]
    syntax = _WRAPPER_SYNTAX.get(program)
    if syntax is not None:
        parsed = _parse(args, syntax)
        rest = parsed.words
        if program == "env":
            for line in parsed.values("-S", "--split-string"):
                found += _line_commands(line or "", depth + 1)
            while rest and _is_assignment(rest[0]):
                rest.pop(0)
        if program == "timeout" and rest:
            rest.pop(0)  # the duration
        found += _unwrapped(rest, depth + 1)
    elif program in _SHELL_C or program == "eval":
        scripts = [" ".join(args)] if program == "eval" else []
        for index, arg in enumerate(args[:-1]):
            if arg.startswith("-") and not arg.startswith("--") and "c" in arg:
                scripts.append(args[index + 1])
        for script in scripts:
            found += _line_commands(script, depth + 1)
    elif program == "find":
        for index, arg in enumerate(args):
            if arg in ("-exec", "-execdir", "-ok", "-okdir"):
                nested = list(itertools.takewhile(lambda a: a not in (";", "+"), args[index + 1 :]))
                found += _unwrapped(nested, depth + 1)
    return found


def _line_commands(line: str, depth: int = 0) -> list[list[str]]:
    """Every command a shell line runs (see :func:`_unwrapped`)."""
    try:
        outer, inner = _split_substitutions(line)
        commands, _, _ = _simple_commands(outer)
    except Unparseable:
        commands, inner = [line.split()], []
    found = [c for argv in commands for c in _unwrapped(argv, depth)]
    for sub in inner:
        found += _line_commands(sub, depth + 1)
    return found


def _blocked(entry: str, argv: Sequence[str]) -> bool:
    """Whether ``entry`` ("rm", "/sbin/reboot", "systemctl stop") names this command: the
    same program, and the entry's other words among its arguments, in order."""
    words = entry.split()
    if not words or not argv or os.path.basename(words[0]) != argv[0]:
        return False
    remaining = iter(argv[1:])
    return all(any(arg == word for arg in remaining) for word in words[1:])


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


def classify(
    command: str,
    args: Sequence[str] = (),
    *,
    shell: bool = False,
    env: Mapping[str, str] | None = None,
) -> str:
    """The level a command needs. Without ``shell`` it is executed as argv, so shell syntax
    in it has no effect and only the program and its arguments count. ``env`` is the
    environment the request sets: any variable outside :data:`SAFE_ENV` makes it
    ``remediate``."""
    level = classify_env(env or {})
    if shell:
        line = " ".join([command, *(shlex.quote(a) for a in args)])
        return strongest([level, classify_shell(line)])
    return strongest([level, classify_argv([command, *args])])


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
    env: Mapping[str, str] | None = None,
) -> Decision:
    """Whether ``policy`` lets this command run. ``requested`` is a level the caller asked
    for explicitly; the command needs the stronger of it and its classification. ``env``
    is the environment the request sets (see :func:`classify`).

    A ``block`` entry matches a part as written (a prefix of whole words), and also every
    command the line runs once assignments and wrappers are stripped (``sudo``, ``env``,
    ``command``, ``timeout 5``, ``sh -c``…): the same program basename, with the entry's
    other words among its arguments in order (``systemctl stop`` blocks
    ``/bin/systemctl --no-block stop sshd``)."""
    required = classify(command, args, shell=shell, env=env)
    if requested is not None:
        required = strongest([required, requested])
    parts = command_parts(command, args, shell=shell)
    if shell:
        runs = _line_commands(" ".join([command, *(shlex.quote(a) for a in args)]))
    else:
        runs = _unwrapped([command, *args])
    for prefix in policy.block:
        for part in parts:
            if _matches(part, prefix):
                return Decision(
                    False, required, f"{part!r} matches blocked prefix {prefix!r}", parts
                )
        for argv in runs:
            if _blocked(prefix, argv):
                shown = " ".join(argv)
                return Decision(False, required, f"{shown!r} matches blocked {prefix!r}", parts)
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
