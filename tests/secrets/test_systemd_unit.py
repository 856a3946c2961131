"""The packaged legerd.service: systemd accepts it, and its command line is one legerd runs."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from tests.support import BIN, REPO, run_cli

UNIT = REPO / "packaging" / "systemd" / "legerd.service"


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    local = tmp_path / "legerd.service"
    local.write_text(text.replace("/usr/bin/legerd", str(BIN / "legerd")))
    verify = subprocess.run(
        [shutil.which("systemd-analyze") or "systemd-analyze", "verify", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr
    directives = _directives(text)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "DynamicUser": "yes",
        "StateDirectory": "legerd",
        "RuntimeDirectory": "legerd",
        "UMask": "0077",
        "CapabilityBoundingSet": "",
    }.items():
        assert value in directives.get(key, []), key


def test_unit_command_line_is_accepted_by_legerd(tmp_path: Path) -> None:
    (exec_start,) = _directives(UNIT.read_text())["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[:2] == ["/usr/bin/legerd", "serve"]
    help_text = run_cli("legerd", "serve", "--help").stdout
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in help_text, flag
