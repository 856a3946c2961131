"""Canonical JSON: sorted keys, compact separators, UTF-8. The one byte form that is signed
or hashed anywhere in Legator (stdlib only, so the probe can use it too)."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
