"""Token counts as a backend reports them, read as untrusted input."""

from __future__ import annotations

from typing import Any

# The usage columns' range (INTEGER: 32 bits on PostgreSQL). No request comes near it.
MAX_COUNT = 2**31 - 1


def count(value: Any) -> int:
    """A count a backend reported, or 0 where it gave none that can be one: a string, a
    boolean, a fraction, a negative number or one past ``MAX_COUNT`` (a row holding it would
    fail the whole batch of usage rows it is written with)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not value.is_integer():
        return 0
    return int(value) if 0 <= value <= MAX_COUNT else 0


def usage_counts(usage: Any) -> tuple[int, int]:
    """Input and output tokens of an OpenAI ``usage`` object (0 for what it lacks)."""
    if not isinstance(usage, dict):
        return 0, 0
    return count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))
