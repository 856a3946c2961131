"""How much of a text fits in a message once encoded as JSON.

The control plane drops a probe message over 4 MiB of JSON text (``fleet.socket``), and JSON
escapes some characters: a NUL, common in binary files and output, takes six (``\\u0000``),
so 1 MiB of it is a 6 MiB message. What the probe sends is cut by its encoded size."""

from __future__ import annotations

import json
import re

# What the control plane accepts of one message is 4 MiB; the rest is room for the fields.
MAX_ANSWER_CHARS = 3 * 1024 * 1024
_ESCAPED = re.compile(r'[\x00-\x1f"\\]')
_BLOCK = 4096


def encoded_len(text: str) -> int:
    """How many characters ``text`` takes as a JSON string, without its quotes."""
    if _ESCAPED.search(text) is None:
        return len(text)
    return len(json.dumps(text, ensure_ascii=False)) - 2


def fit(text: str, budget: int) -> str:
    """The longest start of ``text`` that takes at most ``budget`` characters as JSON (each
    character is escaped on its own, so the lengths of pieces add up)."""
    used = 0
    for at in range(0, len(text), _BLOCK):
        block = text[at : at + _BLOCK]
        cost = encoded_len(block)
        if used + cost <= budget:
            used += cost
            continue
        for offset, char in enumerate(block):
            used += encoded_len(char)
            if used > budget:
                return text[: at + offset]
    return text
