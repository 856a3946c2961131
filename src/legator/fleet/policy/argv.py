"""The level of one program invocation, without shell interpretation."""

from __future__ import annotations

import os
from collections.abc import Sequence

from legator.fleet.policy.env import classify_env, is_assignment
from legator.fleet.policy.known import DIAGNOSE_COMMANDS, OBSERVE_COMMANDS, SHELLS, WRAPPERS
from legator.fleet.policy.levels import DIAGNOSE, OBSERVE, REMEDIATE, strongest
from legator.fleet.policy.programs import SPECIAL


def _program(argv: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """The program's basename, its arguments, and the variables a ``VAR=value`` prefix sets."""
    words = list(argv)
    assigned: list[str] = []
    while words and is_assignment(words[0]):
        assigned.append(words.pop(0).split("=", 1)[0])
    if not words:
        return "", [], assigned
    return os.path.basename(words[0]), words[1:], assigned


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
    special = SPECIAL.get(prog)
    if special is not None:
        return special(args)
    if prog in OBSERVE_COMMANDS:
        return OBSERVE
    if prog in DIAGNOSE_COMMANDS:
        return DIAGNOSE
    return REMEDIATE
