"""``systemctl`` and ``journalctl`` for user or system scope."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass


class SystemdError(RuntimeError):
    pass


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Systemd:
    def __init__(self, *, system: bool = False, timeout: float = 300) -> None:
        self.system = system
        self.timeout = timeout

    def _scope(self) -> list[str]:
        return [] if self.system else ["--user"]

    def _binary(self, name: str) -> str:
        found = shutil.which(name)
        if found is None:
            raise SystemdError(f"{name} not found: leger needs systemd to run services")
        return found

    def run(self, *args: str, check: bool = True) -> Result:
        try:
            proc = subprocess.run(
                [self._binary("systemctl"), *self._scope(), *args],
                capture_output=True,
                text=True,
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired:
            # A failure like any other, so an apply rolls back instead of stopping half-way.
            raise SystemdError(
                f"systemctl {' '.join(args)}: no answer within {self.timeout:g} s"
            ) from None
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}"
            raise SystemdError(f"systemctl {' '.join(args)}: {detail}")
        return result

    def daemon_reload(self) -> None:
        self.run("daemon-reload")

    def start(self, units: Sequence[str]) -> None:
        if units:
            self.run("start", *units)

    def stop(self, units: Sequence[str]) -> None:
        if units:
            self.run("stop", *units, check=False)

    def states(self, units: Sequence[str]) -> dict[str, str]:
        """One ``is-active`` call for all units (it prints one state per line, in order)."""
        if not units:
            return {}
        lines = self.run("is-active", *units, check=False).stdout.split()
        return {unit: lines[i] if i < len(lines) else "unknown" for i, unit in enumerate(units)}

    def status(self, units: Sequence[str]) -> Result:
        return self.run("status", "--no-pager", *units, check=False)

    def wait_healthy(
        self, units: Sequence[str], timeout: float, settle: float = 0.5
    ) -> dict[str, str]:
        """Poll until every unit is active and stays so for ``settle`` seconds, or return the
        states at the deadline (anything not ``active`` is unhealthy)."""
        deadline = time.monotonic() + timeout
        stable_since: float | None = None
        while True:
            states = self.states(units)
            now = time.monotonic()
            if any(state == "failed" for state in states.values()):
                return states
            if all(state == "active" for state in states.values()):
                stable_since = stable_since or now
                if now - stable_since >= settle:
                    return states
            else:
                stable_since = None
            if now >= deadline:
                return states
            time.sleep(0.1)

    def journal_args(self, units: Sequence[str], *, lines: int, follow: bool) -> list[str]:
        args = [self._binary("journalctl"), *self._scope(), "--no-pager", "-n", str(lines)]
        for unit in units:
            args += ["-u", unit]
        return args + (["-f"] if follow else [])
