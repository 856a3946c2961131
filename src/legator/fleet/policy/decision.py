"""A policy (the level it allows, allow and block lists) and the decision it takes on a
command."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from legator.fleet.policy.levels import OBSERVE, rank, strongest
from legator.fleet.policy.shell import classify, command_parts
from legator.fleet.policy.unwrap import blocked, line_commands, unwrapped


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
        runs = line_commands(" ".join([command, *(shlex.quote(a) for a in args)]))
    else:
        runs = unwrapped([command, *args])
    for prefix in policy.block:
        for part in parts:
            if _matches(part, prefix):
                return Decision(
                    False, required, f"{part!r} matches blocked prefix {prefix!r}", parts
                )
        for argv in runs:
            if blocked(prefix, argv):
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
