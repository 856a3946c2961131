"""A policy (the level it allows, allow and block lists) and the decision it takes on a
command."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from legator.fleet.policy.levels import OBSERVE, REMEDIATE, rank, strongest
from legator.fleet.policy.lexer import Unparseable
from legator.fleet.policy.prefixes import Prefixes
from legator.fleet.policy.shell import classify, command_parts
from legator.fleet.policy.unwrap import line_commands, unwrapped

# The kernel takes no single argument longer (``MAX_ARG_STRLEN``), and a shell line is one
# argument of ``/bin/sh -c``: a longer request cannot run, so it is refused before it is
# read (the classifier takes about 8 µs a character; a message may carry 8 MiB).
MAX_REQUEST_CHARS = 128 * 1024


@dataclass(frozen=True)
class Policy:
    level: str = OBSERVE
    allow: tuple[str, ...] = ()
    block: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        rank(self.level)

    # Compiled on first use, once per policy object: the probe and the control plane keep
    # one per policy, not one per command.
    @cached_property
    def allowed_prefixes(self) -> Prefixes:
        return Prefixes(self.allow)

    @cached_property
    def blocked_prefixes(self) -> Prefixes:
        return Prefixes(self.block)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    required: str
    reason: str
    parts: list[str] = field(default_factory=list)


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
    size = len(command) + sum(len(arg) + 1 for arg in args)
    if size > MAX_REQUEST_CHARS:
        why = f"the command is {size} characters, over the {MAX_REQUEST_CHARS} one may have"
        return Decision(False, REMEDIATE, why)
    required = classify(command, args, shell=shell, env=env)
    if requested is not None:
        required = strongest([required, requested])
    parts = command_parts(command, args, shell=shell)
    try:
        if shell:
            runs = line_commands(" ".join([command, *(shlex.quote(a) for a in args)]))
        else:
            runs = unwrapped([command, *args])
    except Unparseable as exc:
        # What cannot be read cannot be matched: the shell runs the commands before a syntax
        # error, so a guess at them would let `ls $((1)); rm -rf /` past a block on `rm`.
        if policy.allow or policy.block:
            why = f"the command cannot be checked against this policy's lists: {exc}"
            return Decision(False, required, why, parts)
        runs = []
    refusal = _blocked(policy.blocked_prefixes, parts, runs)
    if refusal is None and policy.allow:
        refusal = _not_allowed(policy.allowed_prefixes, parts)
    if refusal is not None:
        return Decision(False, required, refusal, parts)
    if rank(required) > rank(policy.level):
        return Decision(
            False,
            required,
            f"command needs level {required}, policy allows up to {policy.level}",
            parts,
        )
    return Decision(True, required, f"level {required} within {policy.level}", parts)


def _blocked(block: Prefixes, parts: list[str], runs: list[list[str]]) -> str | None:
    """Why the first block entry (in the list's order) that names a part, or else a command
    the line runs, refuses it; None if none does."""
    if not block:
        return None
    by_part = min(
        (
            (index, order)
            for order, part in enumerate(parts)
            if (index := block.naming_part(part)) is not None
        ),
        default=None,
    )
    by_run = min(
        (
            (index, order)
            for order, argv in enumerate(runs)
            if (index := block.naming_command(argv)) is not None
        ),
        default=None,
    )
    if by_part is not None and (by_run is None or by_part[0] <= by_run[0]):
        entry, part = block.entries[by_part[0]], parts[by_part[1]]
        return f"{part!r} matches blocked prefix {entry!r}"
    if by_run is not None:
        entry, shown = block.entries[by_run[0]], " ".join(runs[by_run[1]])
        return f"{shown!r} matches blocked {entry!r}"
    return None


def _not_allowed(allow: Prefixes, parts: list[str]) -> str | None:
    for part in parts:
        if allow.naming_part(part) is None:
            return f"{part!r} matches no allowed prefix"
    return None
