"""The real quadlet generator, run with ``-dryrun`` on a directory of units."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from legator.deploy.quadlet.validate import Finding

_CANDIDATES = (
    "/usr/libexec/podman/quadlet",
    "/usr/lib/podman/quadlet",
    "/opt/legator/quadlet/quadlet",
)
_SPLIT = re.compile(r"^---(?P<name>[^\s]+)---$", re.MULTILINE)
_CONVERT = re.compile(r'converting "(?P<file>[^"]+)": (?P<message>.*)$')


def find_generator() -> str | None:
    """``$LEGER_QUADLET``, Podman's own generator, the one ``scripts/install-quadlet.sh`` puts in
    /opt, or ``quadlet`` on PATH."""
    override = os.environ.get("LEGER_QUADLET")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("quadlet")


@dataclass
class DryRun:
    generator: str | None
    units: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return self.generator is not None


def dry_run(directory: Path, *, user: bool = True, timeout: float = 30) -> DryRun:
    generator = find_generator()
    if generator is None:
        return DryRun(None)
    env = {**os.environ, "QUADLET_UNIT_DIRS": str(directory)}
    args = [generator, "-dryrun"] + (["-user"] if user else [])
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        message = f"quadlet gave no answer within {timeout:g} s"
        return DryRun(generator, findings=[Finding("error", "-", "generator", message)])
    result = DryRun(generator, units=parse_output(proc.stdout))
    for line in proc.stderr.splitlines():
        if match := _CONVERT.search(line):
            name = Path(match.group("file")).name
            result.findings.append(Finding("error", name, "generator", match.group("message")))
        elif "Warning:" in line or "warning:" in line:
            text = line.split("]: ", 1)[-1]
            unit = text.split()[1] if text.startswith("Warning: ") else "-"
            result.findings.append(Finding("warning", unit, "generator", text))
        elif "error" in line.lower() and "Loading source" not in line:
            result.findings.append(Finding("error", "-", "generator", line.split("]: ", 1)[-1]))
    if proc.returncode != 0 and not any(f.level == "error" for f in result.findings):
        result.findings.append(
            Finding(
                "error", "-", "generator", f"quadlet exited {proc.returncode}: {proc.stderr[-500:]}"
            )
        )
    return result


def parse_output(stdout: str) -> dict[str, str]:
    """``---name.service---`` headers split the generated units."""
    parts = _SPLIT.split(stdout)
    return {parts[i]: parts[i + 1].strip() + "\n" for i in range(1, len(parts) - 1, 2)}
