"""How large a policy may be: the API refuses a larger one (422) and the probe one that is
pushed to it. With these, matching a command against a policy costs a bounded amount."""

from __future__ import annotations

from collections.abc import Sequence

MAX_ENTRIES = 500  # in each of ``allow``, ``block`` and ``paths``
MAX_ENTRY_CHARS = 256  # an allow or block entry: a program and a few of its words
MAX_PATH_CHARS = 4096  # PATH_MAX


def entry_problem(field: str, entries: Sequence[str], max_chars: int) -> str | None:
    """What is wrong with the list ``field`` of a policy, or None."""
    if len(entries) > MAX_ENTRIES:
        return f"{field} has {len(entries)} entries, over the {MAX_ENTRIES} a policy may have"
    for index, entry in enumerate(entries):
        if len(entry) > max_chars:
            return (
                f"{field}[{index}] is {len(entry)} characters, over the {max_chars} "
                "an entry may have"
            )
    return None


def policy_problem(allow: Sequence[str], block: Sequence[str], paths: Sequence[str]) -> str | None:
    """The first thing that makes a policy too large to take, or None."""
    return (
        entry_problem("allow", allow, MAX_ENTRY_CHARS)
        or entry_problem("block", block, MAX_ENTRY_CHARS)
        or entry_problem("paths", paths, MAX_PATH_CHARS)
    )
