"""Helpers for Deploy tests: run leger, read the systemd stand-in's calls, call podman."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support import run_cli


def podman(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["podman", *args], capture_output=True, input=input, timeout=120)


def leger(
    env: dict[str, str], *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli("leger", *args, env=env, input=input)


def calls(env: dict[str, str]) -> list[list[str]]:
    path = Path(env["FAKE_SYSTEMD_DIR"]) / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["argv"] for line in path.read_text().splitlines()]


def bare_leger_env(tmp_path: Path) -> dict[str, str]:
    """leger's home, configuration, state and quadlet directories under ``tmp_path``: for
    runs that need neither Podman nor the systemd stand-in (see ``leger_env``)."""
    home = tmp_path / "home"
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "LEGER_CONFIG_DIR": str(tmp_path / "config"),
        "LEGER_STATE_DIR": str(tmp_path / "state"),
        "LEGER_QUADLET_DIR": str(tmp_path / "quadlets"),
    }
