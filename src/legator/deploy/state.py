"""``deployments.json``: what is installed, from where, with which files, volumes and secrets."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from legator.core.security import write_private_file

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"deployment name {name!r} must be lowercase letters, digits, '-' or '_' (max 63)"
        )
    return name


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Deployment(BaseModel):
    name: str
    version: int
    source: str
    installed_at: str
    updated_at: str
    files: list[str]
    services: list[str]  # systemd units of the containers, in start order
    volumes: list[str]  # Podman volume names
    ports: list[int] = Field(default_factory=list)
    secrets: dict[str, str] = Field(default_factory=dict)  # name -> HMAC of the value
    started: bool = True


class Deployments:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Deployment]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {name: Deployment.model_validate(item) for name, item in raw.items()}

    def save(self, items: dict[str, Deployment]) -> None:
        data = {name: item.model_dump(mode="json") for name, item in sorted(items.items())}
        write_private_file(self.path, json.dumps(data, indent=2))

    def get(self, name: str) -> Deployment | None:
        return self.load().get(name)

    def put(self, item: Deployment) -> None:
        items = self.load()
        items[item.name] = item
        self.save(items)

    def remove(self, name: str) -> None:
        items = self.load()
        items.pop(name, None)
        self.save(items)
