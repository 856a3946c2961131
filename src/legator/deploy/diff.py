"""Unified diffs between two sets of files, and the services a change touches."""

from __future__ import annotations

import difflib


def changed_files(old: dict[str, bytes], new: dict[str, bytes]) -> list[str]:
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))


def unified(old: dict[str, bytes], new: dict[str, bytes], *, label: tuple[str, str]) -> str:
    parts: list[str] = []
    for name in changed_files(old, new):
        before = old.get(name, b"").decode(errors="replace").splitlines(keepends=True)
        after = new.get(name, b"").decode(errors="replace").splitlines(keepends=True)
        parts += difflib.unified_diff(
            before,
            after,
            fromfile=f"{label[0]}/{name}" if name in old else "/dev/null",
            tofile=f"{label[1]}/{name}" if name in new else "/dev/null",
        )
    return "".join(parts)


def affected_services(names: list[str]) -> list[str]:
    """The services (container units) whose files changed: ``redis.container`` and
    ``redis-data.volume`` both affect ``redis``."""
    found: set[str] = set()
    for name in names:
        stem, _, suffix = name.rpartition(".")
        if suffix == "container":
            found.add(stem)
        elif suffix == "volume" and stem.endswith("-data"):
            found.add(stem[: -len("-data")])
    return sorted(found)
