"""Where leger keeps its state and puts quadlets, for user or system scope."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    system: bool
    state: Path
    quadlets: Path
    config: Path

    @property
    def active(self) -> Path:
        return self.state / "active"

    @property
    def staged(self) -> Path:
        return self.state / "staged"

    @property
    def backups(self) -> Path:
        return self.state / "backups"

    @property
    def deployments(self) -> Path:
        return self.state / "deployments.json"

    @property
    def auth_file(self) -> Path:
        return self.config / "auth.json"

    def ensure(self) -> None:
        for path in (self.state, self.active, self.staged, self.backups, self.quadlets):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)


def layout(system: bool = False) -> Layout:
    """``LEGER_STATE_DIR``, ``LEGER_QUADLET_DIR`` and ``LEGER_CONFIG_DIR`` override the
    defaults (tests and unusual hosts); otherwise the XDG paths, or /var/lib and /etc."""
    home = Path.home()
    if system:
        state, quadlets, config = (
            Path("/var/lib/leger"),
            Path("/etc/containers/systemd"),
            Path("/etc/leger"),
        )
    else:
        data = Path(os.environ.get("XDG_DATA_HOME") or home / ".local/share")
        conf = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
        state, quadlets, config = data / "leger", conf / "containers/systemd", conf / "leger"
    return Layout(
        system=system,
        state=Path(os.environ.get("LEGER_STATE_DIR") or state),
        quadlets=Path(os.environ.get("LEGER_QUADLET_DIR") or quadlets),
        config=Path(os.environ.get("LEGER_CONFIG_DIR") or config),
    )
