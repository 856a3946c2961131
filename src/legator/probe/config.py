"""``probe.yaml``: where the control plane is, who this probe is, and its local ceiling."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError

from legator.fleet.protocol import Level

DEFAULT_CONFIG_DIR = Path("/etc/legator")
CONFIG_NAME = "probe.yaml"


class ConfigProblem(Exception):
    pass


class ProbeConfig(BaseModel):
    server: str = Field(pattern=r"^https?://")
    probe_id: str
    api_key: str
    signing_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    policy_level: Level = "diagnose"  # the local maximum: nothing from the server raises it
    # Whether the control plane may replace this probe's code (an update runs whatever it
    # sends, as the probe's user): unset, only where the local maximum is remediate.
    allow_updates: bool | None = None
    policy_id: str = ""
    tags: list[str] = Field(default_factory=list)
    heartbeat_s: float = Field(30.0, gt=0, le=3600)
    inventory_s: float = Field(900.0, gt=0, le=86400)
    max_concurrent: int = Field(4, ge=1, le=256)
    work_dir: str | None = None

    def updates_allowed(self) -> bool:
        if self.allow_updates is None:
            return self.policy_level == "remediate"
        return self.allow_updates


def default_config_dir() -> Path:
    if os.geteuid() == 0:
        return DEFAULT_CONFIG_DIR
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "legator"


def load(path: Path) -> ProbeConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigProblem(f"{path} does not exist: run `legator-probe init` first") from None
    except yaml.YAMLError as exc:
        raise ConfigProblem(f"{path} is not valid YAML: {exc}") from None
    try:
        return ProbeConfig.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        raise ConfigProblem(f"{path}: {where}: {first['msg']}") from None


def save(config: ProbeConfig, path: Path) -> None:
    """Written 0600 from the start and swapped in atomically (it holds the probe's keys)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    text = yaml.safe_dump(config.model_dump(exclude_none=True), sort_keys=False)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
