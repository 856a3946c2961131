"""The level of one program invocation, without shell interpretation."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

from legator.fleet.policy.env import classify_env, is_assignment
from legator.fleet.policy.known import DIAGNOSE_COMMANDS, OBSERVE_COMMANDS, SHELLS, WRAPPERS
from legator.fleet.policy.levels import DIAGNOSE, OBSERVE, REMEDIATE, strongest
from legator.fleet.policy.options import parse
from legator.fleet.policy.programs import SPECIAL
from legator.fleet.policy.unwrap import WRAPPER_SYNTAX

# Where the system keeps its programs: a known name elsewhere (/tmp/ls, ./cat) is a file
# anyone may have written, not the program the name stands for.
SYSTEM_DIRS = frozenset(
    {"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"}
)


def _program(argv: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """The program's basename, its arguments, and the variables a ``VAR=value`` prefix sets;
    a path outside :data:`SYSTEM_DIRS` gives a name no rule knows (so, ``remediate``)."""
    words = list(argv)
    assigned: list[str] = []
    while words and is_assignment(words[0]):
        assigned.append(words.pop(0).split("=", 1)[0])
    if not words:
        return "", [], assigned
    program = words[0]
    if "/" in program and posixpath.dirname(posixpath.normpath(program)) not in SYSTEM_DIRS:
        return program, words[1:], assigned
    return os.path.basename(program), words[1:], assigned


# Wrappers in front of one program (``sudo timeout 5 nice …``): past this many the command
# is ``remediate`` without reading further (each one costs a pass over the rest of it).
MAX_WRAPPERS = 16


def classify_argv(argv: Sequence[str]) -> str:
    """The level of one program invocation (no shell interpretation)."""
    levels: list[str] = []
    for _ in range(MAX_WRAPPERS + 1):
        prog, args, assigned = _program(argv)
        if classify_env(assigned) == REMEDIATE:
            return REMEDIATE  # PATH=…, LD_PRELOAD=…, LESSOPEN=… change what runs
        if prog not in WRAPPERS:
            return strongest([*levels, _classify_program(prog, args)])
        # Read the wrapper's options as it does: ``time -o ls rm …`` writes ./ls and runs rm.
        parsed = parse(args, WRAPPER_SYNTAX[prog])
        writes = prog == "time" and parsed.has("-o", "--output")
        if writes or not all(o.sure for o in parsed.options):
            return REMEDIATE  # time -o writes a file; an abbreviation may have taken a value
        levels.append(DIAGNOSE if prog in {"ionice", "nice"} else OBSERVE)
        argv = parsed.words[1:] if prog == "timeout" else parsed.words  # past the duration
    return REMEDIATE


def _classify_program(prog: str, args: list[str]) -> str:
    """The level of a program that is not a wrapper."""
    if not prog:
        return OBSERVE
    if prog in SHELLS or prog.startswith("$") or prog == "__subst__":
        return REMEDIATE
    special = SPECIAL.get(prog)
    if special is not None:
        return special(args)
    if prog in OBSERVE_COMMANDS:
        return OBSERVE
    if prog in DIAGNOSE_COMMANDS:
        return DIAGNOSE
    return REMEDIATE
