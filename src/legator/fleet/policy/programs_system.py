"""Rules for system administration tools: systemd's ``*ctl`` programs and journalctl, date,
hostname, sysctl, mount, fuser, package managers, firewalls, and the inspection tools that
can also change something (dmesg, ss, route, arp, ethtool, smartctl, nvidia-smi, sar…)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from legator.fleet.policy.levels import DIAGNOSE, OBSERVE, REMEDIATE
from legator.fleet.policy.options import Syntax, names, parse, unless_given, verb

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


_SYSTEMCTL = Syntax(
    short_values="tpPsHMnoC",
    short_flags="ahlqrfiT",
    long_values=names(
        "type property state signal kill-whom kill-value host machine lines output job-mode "
        "root image image-policy preset-mode boot-loader-menu boot-loader-entry "
        "reboot-argument timestamp what check-inhibitors message when drop-in legend "
        "capsule"
    ),
    long_flags=names(
        "all recursive reverse after before with-dependencies full value show-types fail "
        "irreversible ignore-dependencies ignore-inhibitors dry-run quiet no-warn no-block "
        "wait user system global no-wall no-reload no-ask-password runtime force now plain "
        "failed firmware-setup read-only mkdir marked no-pager no-legend help version "
        "show-transaction"
    ),
)


def _systemctl(args: list[str]) -> str:
    word = verb(parse(args, _SYSTEMCTL))
    return DIAGNOSE if word == "" or word in _SYSTEMCTL_READ else REMEDIATE


_JOURNALCTL = Syntax(  # short options are all read as flags: none of them writes
    long_values=names("cursor-file vacuum-size vacuum-time vacuum-files"),
    long_flags=names(
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
    return REMEDIATE if parse(args, _JOURNALCTL).has(*_JOURNALCTL_WRITES) else DIAGNOSE


_DATE = Syntax(
    short_values="dfrs",
    short_optional="I",
    long_values=names("date file reference set rfc-3339 resolution"),
    long_flags=names("debug iso-8601 rfc-email universal utc uct help version"),
)


def _date(args: list[str]) -> str:
    parsed = parse(args, _DATE)
    if parsed.has("-s", "--set") or any(not word.startswith("+") for word in parsed.words):
        return REMEDIATE  # date MMDDhhmm sets the clock too
    return OBSERVE


def _hostname(args: list[str]) -> str:
    return (
        REMEDIATE
        if any(not a.startswith("-") for a in args) or _has_flag(args, "-F", "--file", "-b")
        else OBSERVE
    )


_CTL_OPTIONS = Syntax(
    short_values="HMp",
    short_flags="ahql",
    long_values=names("host machine property json output"),
    long_flags=names(
        "static transient pretty no-ask-password help version all value no-pager no-legend "
        "full monitor adjust-system-clock"
    ),
)


def _ctl(reads: frozenset[str], level: str = OBSERVE) -> Callable[[list[str]], str]:
    """hostnamectl, timedatectl, localectl, loginctl…: reading verbs only; any other verb
    (``set-*``, ``kill-*``…) changes the system."""

    def check(args: list[str]) -> str:
        word = verb(parse(args, _CTL_OPTIONS))
        return (
            level
            if word is not None and (word == "" or word in reads or word.startswith("list-"))
            else REMEDIATE
        )

    return check


_FUSER = Syntax(short_values="n", long_values=names("namespace"), long_flags=names("kill"))


def _fuser(args: list[str]) -> str:
    return REMEDIATE if parse(args, _FUSER).has("-k", "--kill") else DIAGNOSE


def _package(args: list[str]) -> str:
    word = _first_positional(args)
    return DIAGNOSE if word in _PACKAGE_READ else REMEDIATE


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


# --pipe runs a shell command; --eval and --define expand macros, and ``%(cmd)`` runs cmd;
# --macros, --rcfile and --load read macro files; --dbpath and --root use another database.
_RPM_CODE = ("--pipe", "--eval", "-E", "--define", "-D", "--macros", "--rcfile", "--load",
             "--dbpath", "--root", "-r")  # fmt: skip


def _rpm(args: list[str]) -> str:
    if _has_flag(args, *_RPM_CODE):
        return REMEDIATE
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


def _nft(args: list[str]) -> str:
    return (
        DIAGNOSE if _first_positional(args) in ("list", "-a") and "flush" not in args else REMEDIATE
    )


_READ_ONLY_TABLES = (
    "-L", "-S", "--list", "--list-rules", "-n", "-v", "-t", "--line-numbers", "-x"
)  # fmt: skip


_DMESG = Syntax(
    short_values="Fflns",
    long_values=names("file facility level console-level buffer-size since until time-format"),
    long_flags=names("clear read-clear console-off console-on"),
)
_DMESG_WRITES = frozenset(
    {"-C", "-c", "-D", "-E", "-n", "--clear", "--read-clear", "--console-off", "--console-on",
     "--console-level"}
)  # fmt: skip
_SS = Syntax(
    short_values="fAFDN",
    long_values=names("family query socket filter diag net"),
    long_flags=names("kill"),
)
_LASTLOG = Syntax(
    short_values="btu", long_values=names("before time user"), long_flags=names("clear set")
)
_DMIDECODE = Syntax(
    short_values="dstH",
    long_values=names("dev-mem string type handle dump-bin from-dump"),
)
_FILE = Syntax(short_values="mefFP", long_values=names("magic-file exclude separator parameter"),
               long_flags=names("compile"))  # fmt: skip
_SMARTCTL = Syntax(
    short_values="dTbrnFvlgPBsoStqf",
    long_values=names("smart offlineauto saveauto test set"),
    long_flags=names("abort captive"),
)
_SMARTCTL_WRITES = frozenset(
    {"-s", "-o", "-S", "-t", "-X", "-C", "--smart", "--offlineauto", "--saveauto", "--test",
     "--set", "--abort", "--captive"}
)  # fmt: skip
_ARP = Syntax(
    short_values="HiAp",
    long_values=names("hw-type device protocol"),
    long_flags=names("delete set file"),
)
_SENSORS = Syntax(short_values="c", long_values=names("config-file"), long_flags=names("set"))


def _route(args: list[str]) -> str:
    """``route`` and ``route -n`` list; any word (``add``, ``del``…) changes the table."""
    parsed = parse(args, Syntax(short_values="A", long_values=names("family")))
    return REMEDIATE if parsed.words else DIAGNOSE


_ETHTOOL_READ = frozenset(
    {"-a", "-c", "-g", "-i", "-k", "-l", "-P", "-S", "-T", "-d", "-e", "-m", "-n", "-u", "-x",
     "--show-pause", "--show-coalesce", "--show-ring", "--driver", "--show-features",
     "--show-offload", "--show-channels", "--show-permaddr", "--statistics",
     "--show-time-stamping", "--register-dump", "--eeprom-dump", "--dump-module-eeprom",
     "--module-info", "--show-nfc", "--show-ntuple", "--show-rxfh-indir", "--show-rxfh",
     "--show-eee", "--show-fec", "--show-priv-flags", "--show-tunnels"}
)  # fmt: skip


def _ethtool(args: list[str]) -> str:
    """Showing only: ``ethtool DEV`` or one of the ``--show-*`` style options and its device;
    every other option (``-s``, ``-K``, ``-E``, ``-f``…) sets or flashes something."""
    rest = [a for a in args if a not in ("--json", "-j", "-I", "--include-statistics")]
    if len(rest) == 1 and not rest[0].startswith("-"):
        return DIAGNOSE
    if rest and rest[0] in _ETHTOOL_READ and not any(a.startswith("-") for a in rest[1:]):
        return DIAGNOSE
    return REMEDIATE


_NVIDIA_SMI_READ = frozenset({"-q", "--query", "-L", "--list-gpus", "-x", "--xml-format",
                              "-u", "--unit", "-h", "--help"})  # fmt: skip
_NVIDIA_SMI_VALUES = frozenset({"-i", "--id", "-d", "--display", "-l", "--loop", "-lms",
                                "--loop-ms"})  # fmt: skip


def _nvidia_smi(args: list[str]) -> str:
    """Queries only: every other option (``-r``, ``-pm``, ``-pl``, ``-f FILE``…) resets the
    card, changes a setting or writes a file."""
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name = arg.split("=", 1)[0]
        if name in _NVIDIA_SMI_VALUES:
            if "=" not in arg and rest:
                rest.pop(0)
        elif not (arg in _NVIDIA_SMI_READ or name.startswith("--query-") or name == "--format"):
            return REMEDIATE
    return DIAGNOSE


def _sar(args: list[str]) -> str:
    return REMEDIATE if any(a.startswith("-o") for a in args) else DIAGNOSE  # -o FILE writes


def _pidstat(args: list[str]) -> str:
    return REMEDIATE if _has_flag(args, "-e") else DIAGNOSE  # -e PROGRAM runs it


RULES: dict[str, Callable[[list[str]], str]] = {
    "systemctl": _systemctl,
    "journalctl": _journalctl,
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
    "fuser": _fuser,
    "dmesg": unless_given(_DMESG, _DMESG_WRITES),
    "ss": unless_given(_SS, frozenset({"-K", "--kill", "-D", "--diag"})),
    "lastlog": unless_given(_LASTLOG, frozenset({"-C", "-S", "--clear", "--set"}), OBSERVE),
    "dmidecode": unless_given(_DMIDECODE, frozenset({"--dump-bin"}), OBSERVE),
    "file": unless_given(_FILE, frozenset({"-C", "--compile"}), OBSERVE),
    "smartctl": unless_given(_SMARTCTL, _SMARTCTL_WRITES),
    "arp": unless_given(_ARP, frozenset({"-d", "-s", "-f", "--delete", "--set", "--file"})),
    "sensors": unless_given(_SENSORS, frozenset({"-s", "--set"})),
    "route": _route,
    "ethtool": _ethtool,
    "nvidia-smi": _nvidia_smi,
    "sar": _sar,
    "pidstat": _pidstat,
}
