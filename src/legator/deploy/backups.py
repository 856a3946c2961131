"""Backups of a deployment: its quadlet files and its named volumes (``podman volume export``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from legator.core.security import random_hex
from legator.deploy.podman import Podman
from legator.deploy.state import now

META = "backup.json"
DEFAULT_KEEP_BACKUPS = 10
# A temporary tree of ``create`` this old belongs to no live process: ``backup create`` runs
# without the state lock, so age is what tells a killed one from one still being written.
STALE_SECONDS = 3600


class BackupError(RuntimeError):
    pass


class BackupInfo(BaseModel):
    id: str
    deployment: str
    created_at: str
    reason: str
    automatic: bool
    version: int
    files: list[str]
    volumes: list[str]
    size: int
    # Orders backups taken within one second (``created_at`` has whole seconds): pruning
    # must know which is the newest. 0 in backups written before it existed.
    created_ns: int = 0


@dataclass(frozen=True)
class Backups:
    root: Path
    podman: Podman

    def create(
        self,
        deployment: str,
        version: int,
        files: dict[str, bytes],
        volumes: list[str],
        *,
        reason: str,
        automatic: bool,
    ) -> BackupInfo:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        backup_id = "bk_" + random_hex(8)
        tmp = Path(tempfile.mkdtemp(prefix=f".{backup_id}.", dir=self.root))
        try:
            (tmp / "files").mkdir()
            (tmp / "volumes").mkdir()
            for name, data in files.items():
                (tmp / "files" / name).write_bytes(data)
            saved = []
            for volume in self.podman.volumes_existing(volumes):
                self.podman.volume_export(volume, tmp / "volumes" / f"{volume}.tar")
                saved.append(volume)
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            info = BackupInfo(
                id=backup_id,
                deployment=deployment,
                created_at=now(),
                reason=reason,
                automatic=automatic,
                version=version,
                files=sorted(files),
                volumes=saved,
                size=size,
                created_ns=time.time_ns(),
            )
            (tmp / META).write_text(info.model_dump_json(indent=2))
            os.rename(tmp, self.root / backup_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info

    def list(self, deployment: str | None = None) -> list[BackupInfo]:
        if not self.root.exists():
            return []
        found = []
        for path in self.root.iterdir():
            if path.is_dir() and not path.name.startswith(".") and (path / META).exists():
                info = BackupInfo.model_validate_json((path / META).read_text())
                if deployment is None or info.deployment == deployment:
                    found.append(info)
        return sorted(found, key=lambda b: (b.created_at, b.created_ns), reverse=True)

    def info(self, backup_id: str) -> BackupInfo:
        path = self.root / backup_id
        if "/" in backup_id or not (path / META).exists():
            raise BackupError(f"no backup {backup_id!r}")
        return BackupInfo.model_validate_json((path / META).read_text())

    def files(self, backup_id: str) -> dict[str, bytes]:
        info = self.info(backup_id)
        return {name: (self.root / backup_id / "files" / name).read_bytes() for name in info.files}

    def restore_volumes(self, backup_id: str) -> list[str]:
        """Replace each volume by its exported copy: remove, create, then import (Podman's
        import needs an existing volume and would merge into a non-empty one)."""
        info = self.info(backup_id)
        for volume in info.volumes:
            self.podman.volume_remove(volume)
            self.podman.volume_import(volume, self.root / backup_id / "volumes" / f"{volume}.tar")
        return info.volumes

    def prune(self, deployment: str, keep: int, *, protect: set[int]) -> list[str]:
        """Delete the automatic backups of ``deployment`` past the newest ``keep`` (0 keeps
        all), except the newest one of each version in ``protect``: the only copy of that
        version's files and volumes. Manual backups are never pruned. Returns the ids."""
        self._clear_leftovers()
        if keep <= 0:
            return []
        automatic = [b for b in self.list(deployment) if b.automatic]
        kept = {b.id for b in automatic[:keep]}
        for version in protect:
            newest = next((b for b in automatic if b.version == version), None)
            if newest is not None:
                kept.add(newest.id)
        doomed = [b.id for b in automatic if b.id not in kept]
        for backup_id in doomed:
            self._delete(backup_id)
        return doomed

    def _delete(self, backup_id: str) -> None:
        """Rename first, so that ``list`` never shows a backup half deleted; a deletion cut
        short leaves a dot-name that ``_clear_leftovers`` finishes."""
        doomed = self.root / f".{backup_id}.deleting"
        os.rename(self.root / backup_id, doomed)
        shutil.rmtree(doomed)

    def _clear_leftovers(self) -> None:
        if not self.root.exists():
            return
        stale = time.time() - STALE_SECONDS
        for path in self.root.iterdir():
            if not path.name.startswith(".bk_") or path.is_symlink() or not path.is_dir():
                continue
            if path.name.endswith(".deleting") or path.stat().st_mtime < stale:
                shutil.rmtree(path, ignore_errors=True)
