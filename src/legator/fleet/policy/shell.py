# ruff: noqa: S604  (shell=True here classifies a line; nothing is executed)
"""The level of a shell command line, and of a request (command, arguments, environment);
the simple commands of a line as text, for allow/block prefix matching."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from legator.fleet.policy.argv import classify_argv
from legator.fleet.policy.env import classify_env
from legator.fleet.policy.levels import REMEDIATE, strongest
from legator.fleet.policy.lexer import Unparseable, simple_commands, split_substitutions


def classify_shell(line: str) -> str:
    """The level of a shell command line (``/bin/sh -c`` semantics)."""
    try:
        outer, inner = split_substitutions(line)
        commands, writes, opaque = simple_commands(outer)
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
        outer, inner = split_substitutions(line)
        commands, _, _ = simple_commands(outer)
    except Unparseable:
        return [line]
    parts = [" ".join(argv) for argv in commands]
    for sub in inner:
        parts += command_parts(sub, shell=True)
    return parts
