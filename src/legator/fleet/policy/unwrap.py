"""The commands a line or argv runs, past assignments and wrappers (``sudo``, ``env``,
``timeout 5``…), into ``sh -c`` strings, ``eval`` and ``find -exec``. Used to match the
``block`` list (``prefixes``), not to classify."""

from __future__ import annotations

import os
from collections.abc import Sequence

from legator.fleet.policy.env import is_assignment
from legator.fleet.policy.lexer import Unparseable, simple_commands, split_substitutions
from legator.fleet.policy.options import Syntax, names, parse

WRAPPER_SYNTAX = {
    "command": Syntax(stop_at_word=True),
    "builtin": Syntax(stop_at_word=True),
    "exec": Syntax(short_values="a", stop_at_word=True),
    "nohup": Syntax(stop_at_word=True),
    "busybox": Syntax(stop_at_word=True),
    "nice": Syntax(short_values="n", long_values=names("adjustment"), stop_at_word=True),
    "sudo": Syntax(
        short_values="CDgpRrtTUu",
        long_values=names(
            "close-from chdir group prompt chroot role type command-timeout other-user user host"
        ),
        stop_at_word=True,
    ),
    "doas": Syntax(short_values="uC", stop_at_word=True),
    "timeout": Syntax(
        short_values="sk",
        long_values=names("signal kill-after"),
        long_flags=names("foreground preserve-status verbose help version"),
        stop_at_word=True,
    ),
    "stdbuf": Syntax(
        short_values="ioe", long_values=names("input output error"), stop_at_word=True
    ),
    "time": Syntax(
        short_values="fo",
        long_values=names("format output"),
        long_flags=names("append portability quiet verbose help version"),
        stop_at_word=True,
    ),
    "ionice": Syntax(short_values="cnpPu", stop_at_word=True),
    "env": Syntax(
        short_values="uCS",
        long_values=names("unset chdir split-string"),
        stop_at_word=True,
    ),
    "xargs": Syntax(short_values="aEdIsnLP", short_optional="eil", stop_at_word=True),
}
_FIND_ACTIONS = frozenset({"-exec", "-execdir", "-ok", "-okdir"})
_SHELL_C = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "su"})
MAX_DEPTH = 8  # wrappers, shells and substitutions within one another


def unwrapped(argv: Sequence[str], depth: int = 0) -> list[list[str]]:
    """The commands an argv runs, each as ``[program basename, *args]``: past assignments
    and wrappers (``sudo``, ``env``, ``timeout 5``…), into ``sh -c`` strings, ``eval`` and
    ``find -exec``. Used to match the ``block`` list, not to classify. Raises ``Unparseable``
    where a nested line cannot be read or the nesting is deeper than ``MAX_DEPTH``."""
    words = list(argv)
    while words and is_assignment(words[0]):
        words.pop(0)
    if not words:
        return []
    if depth > MAX_DEPTH:
        raise Unparseable(f"commands nested more than {MAX_DEPTH} deep")
    program, args = os.path.basename(words[0]), words[1:]
    found = [[program, *args]]
    syntax = WRAPPER_SYNTAX.get(program)
    if syntax is not None:
        parsed = parse(args, syntax)
        rest = parsed.words
        if program == "env":
            for line in parsed.values("-S", "--split-string"):
                found += line_commands(line or "", depth + 1)
            while rest and is_assignment(rest[0]):
                rest.pop(0)
        if program == "timeout" and rest:
            rest.pop(0)  # the duration
        found += unwrapped(rest, depth + 1)
    elif program in _SHELL_C or program == "eval":
        scripts = [" ".join(args)] if program == "eval" else []
        for index, arg in enumerate(args[:-1]):
            if arg.startswith("-") and not arg.startswith("--") and "c" in arg:
                scripts.append(args[index + 1])
        for script in scripts:
            found += line_commands(script, depth + 1)
    elif program == "find":
        for nested in _find_actions(args):
            found += unwrapped(nested, depth + 1)
    return found


def _find_actions(args: Sequence[str]) -> list[list[str]]:
    """The commands of ``find``'s ``-exec``, ``-execdir``, ``-ok`` and ``-okdir``, each read
    up to its ``;`` or ``+``. Inside one, ``-exec`` is an argument as ``find`` reads it: read
    again from each, a line of them without a ``;`` was quadratic."""
    actions: list[list[str]] = []
    index = 0
    while index < len(args):
        if args[index] in _FIND_ACTIONS:
            end = index + 1
            while end < len(args) and args[end] not in (";", "+"):
                end += 1
            actions.append(list(args[index + 1 : end]))
            index = end
        index += 1
    return actions


def line_commands(line: str, depth: int = 0) -> list[list[str]]:
    """Every command a shell line runs (see :func:`unwrapped`). Raises ``Unparseable`` for
    a line, or a line nested in it, that cannot be read: the shell still runs what comes
    before a syntax error (``ls\nrm -rf /\n'``), so no guess at its commands is safe."""
    outer, inner = split_substitutions(line)
    commands, _, _ = simple_commands(outer)
    found = [c for argv in commands for c in unwrapped(argv, depth)]
    for sub in inner:
        found += line_commands(sub, depth + 1)
    return found
