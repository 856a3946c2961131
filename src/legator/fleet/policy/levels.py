"""The three levels, weakest first, and how they compare."""

from __future__ import annotations

from collections.abc import Iterable

OBSERVE, DIAGNOSE, REMEDIATE = "observe", "diagnose", "remediate"
_RANK = {OBSERVE: 0, DIAGNOSE: 1, REMEDIATE: 2}
_NAMES = (OBSERVE, DIAGNOSE, REMEDIATE)


def rank(level: str) -> int:
    try:
        return _RANK[level]
    except KeyError:
        raise ValueError(
            f"unknown level {level!r}: expected observe, diagnose or remediate"
        ) from None


def strongest(levels: Iterable[str]) -> str:
    return _NAMES[max((rank(level) for level in levels), default=0)]


def weakest(a: str, b: str) -> str:
    return _NAMES[min(rank(a), rank(b))]
