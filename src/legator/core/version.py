"""Version, commit and build date for ``/version`` and ``legator version``."""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

from legator import __version__


@cache
def build_info() -> dict[str, str]:
    commit = os.environ.get("LEGATOR_BUILD_COMMIT", "")
    date = os.environ.get("LEGATOR_BUILD_DATE", "")
    if not commit:
        source = Path(__file__).resolve().parents[3]
        if (source / ".git").exists():
            try:
                out = subprocess.run(
                    ["git", "-C", str(source), "log", "-1", "--format=%H %cI"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout.split()
                commit, date = out[0], date or out[1]
            except (OSError, subprocess.SubprocessError, IndexError):
                pass
    return {"version": __version__, "commit": commit or "unknown", "date": date or "unknown"}
