"""The few Podman operations leger needs, through the ``podman`` CLI (Podman's own
stable interface; its REST socket is not running on most hosts)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


class PodmanError(RuntimeError):
    pass


class Podman:
    def __init__(self, binary: str | None = None, timeout: float = 300) -> None:
        found = binary or shutil.which("podman")
        if found is None:
            raise PodmanError("podman is not installed (apt install podman)")
        self.binary = found
        self.timeout = timeout

    def _call(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(
                [self.binary, *args], input=stdin, capture_output=True, timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            # A failure like any other, so an apply rolls back instead of stopping half-way.
            raise PodmanError(
                f"podman {' '.join(args[:2])}: no answer within {self.timeout:g} s"
            ) from None

    def _run(self, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
        proc = self._call(*args, stdin=stdin)
        if check and proc.returncode != 0:
            message = proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
            raise PodmanError(f"podman {args[0]} {args[1] if len(args) > 1 else ''}: {message}")
        return proc.stdout.decode(errors="replace")

    # secrets: the value travels on stdin, never in argv
    def secret_ids(self) -> dict[str, str]:
        """Every secret's name and ID (each ``secret create`` gives a new ID)."""
        out = self._run("secret", "ls", "--format", "{{.Name}} {{.ID}}")
        pairs = (line.split() for line in out.splitlines())
        return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}

    def secret_names(self) -> set[str]:
        return set(self.secret_ids())

    def secret_create(self, name: str, value: bytes) -> str:
        """Create ``name`` with ``value`` (on stdin); returns the new secret's ID."""
        return self._run("secret", "create", name, "-", stdin=value).strip()

    def secret_remove(self, name: str) -> None:
        self._run("secret", "rm", name, check=False)

    # volumes
    def _exists_rc(self, kind: str, name: str) -> bool:
        return self._call(kind, "exists", name).returncode == 0

    def volume_create(self, name: str) -> None:
        if not self._exists_rc("volume", name):
            self._run("volume", "create", name)

    def volume_export(self, name: str, target: Path) -> None:
        self._run("volume", "export", name, "--output", str(target))

    def volume_import(self, name: str, source: Path) -> None:
        """Creates the volume first: ``podman volume import`` refuses a missing one."""
        self.volume_create(name)
        self._run("volume", "import", name, str(source))

    def volume_remove(self, name: str) -> None:
        self._run("volume", "rm", "--force", name, check=False)

    def volumes_existing(self, names: list[str]) -> list[str]:
        if not names:
            return []
        out = self._run("volume", "ls", "--format", "{{.Name}}")
        present = {line.strip() for line in out.splitlines()}
        return [name for name in names if name in present]

    def network_remove(self, name: str) -> None:
        self._run("network", "rm", name, check=False)
