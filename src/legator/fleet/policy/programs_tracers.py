"""Rules for tracers: strace, ltrace and perf."""

from __future__ import annotations

from collections.abc import Callable

from legator.fleet.policy.levels import DIAGNOSE, REMEDIATE
from legator.fleet.policy.options import Syntax, names, parse


def _tracer(
    syntax: Syntax, attach: frozenset[str], writes: frozenset[str]
) -> Callable[[list[str]], str]:
    """strace, ltrace, perf stat/trace: diagnose only when attaching to running processes
    (``-p PID``) without a command of their own to run and without writing a file."""

    def check(args: list[str]) -> str:
        parsed = parse(args, syntax)
        if parsed.words or parsed.has(*writes) or not parsed.has(*attach):
            return REMEDIATE
        if any("inject" in v or "fault" in v for v in parsed.values("-e") if v):
            return REMEDIATE  # fault injection changes what the traced process does
        return DIAGNOSE

    return check


_STRACE = Syntax(
    short_values="abeEIoOpPsSuUX",
    long_values=names(
        "attach output env user trace signal abbrev verbose raw read write string-limit "
        "columns summary-sort-by trace-path detach-on status quiet decode-fds silence"
    ),
    long_flags=names("follow-forks output-separately summary summary-only"),
)
_STRACE_WRITES = frozenset(
    {"-o", "--output", "-E", "--env", "-u", "--user", "--inject", "--fault", "--kill-on-exit",
     "--daemonize", "-D"}
)  # fmt: skip
_LTRACE = Syntax(
    short_values="aAeFlLnoOpsuwxX",
    long_values=names("output library config user indent align"),
)
_PERF_TRACE = Syntax(
    short_values="eptCGoIrxMDjFcmu",
    long_values=names("pid tid output event cpu interval-print objdump"),
    long_flags=names("all-cpus append"),
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


RULES: dict[str, Callable[[list[str]], str]] = {
    "strace": _TRACERS["strace"],
    "ltrace": _TRACERS["ltrace"],
    "perf": _perf,
}
