"""Backups of a deployment: its quadlet files and its named volumes (``podman volume export``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from legator.core.security import random_hex
from legator.deploy.podman import Podman
from legator.deploy.state import now

META = "backup.json"
DEFAULT_KEEP_BACKUPS = 10


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
    """The backups folder. ``create`` and ``prune`` are called holding leger's state lock
    (every caller does): a temporary tree found there then belongs to no live process."""

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
        self._clear_leftovers()
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

    def way_back(self, deployment: str, recorded: int | None) -> set[int]:
        """The versions whose newest automatic backup a prune outside an apply keeps: the
        recorded one, and the one the last apply replaced (held by the newest automatic
        backup, the one taken before that apply)."""
        newest = next((b for b in self.list(deployment) if b.automatic), None)
        return {v for v in (recorded, newest.version if newest else None) if v is not None}

    def doomed(self, deployment: str, keep: int, *, protect: set[int]) -> list[BackupInfo]:
        """The automatic backups of ``deployment`` past the newest ``keep`` (0 keeps all),
        except the newest one of each version in ``protect``: the only copy of that
        version's files and volumes. Manual backups are never among them. Newest first."""
        if keep <= 0:
            return []
        automatic = [b for b in self.list(deployment) if b.automatic]
        kept = {b.id for b in automatic[:keep]}
        for version in protect:
            newest = next((b for b in automatic if b.version == version), None)
            if newest is not None:
                kept.add(newest.id)
        return [b for b in automatic if b.id not in kept]

    def prune(
        self,
        deployment: str,
        keep: int,
        *,
        protect: set[int],
        stop: Callable[[], bool] = lambda: False,
    ) -> list[BackupInfo]:
        """Delete the ``doomed`` backups, newest first; returns those deleted. ``stop`` is
        asked before each: true, the rest are kept for a later prune."""
        self._clear_leftovers()
        deleted = []
        for info in self.doomed(deployment, keep, protect=protect):
            if stop():
                break
            self._delete(info.id)
            deleted.append(info)
        return deleted

    def _delete(self, backup_id: str) -> None:
        """Rename first, so that ``list`` never shows a backup half deleted; a deletion cut
        short leaves a dot-name that ``_clear_leftovers`` finishes."""
        doomed = self.root / f".{backup_id}.deleting"
        os.rename(self.root / backup_id, doomed)
        shutil.rmtree(doomed)

    def _clear_leftovers(self) -> None:
        """Remove what a ``create`` or a deletion killed half-way left (``.bk_…``): every
        writer holds the state lock, so none of them is still being written."""
        if not self.root.exists():
            return
        for path in self.root.iterdir():
            if path.name.startswith(".bk_") and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
