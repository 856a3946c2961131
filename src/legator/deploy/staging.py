"""Staged updates: verified files waiting in ``staged/NAME`` until ``apply``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from legator.deploy.manifest import MANIFEST_NAME, Manifest, verify
from legator.deploy.sources import Fetched
from legator.deploy.state import check_name, now

META = "leger-stage.json"


class StagingError(RuntimeError):
    pass


@dataclass(frozen=True)
class Staged:
    name: str
    directory: Path
    manifest: Manifest
    source: str
    staged_at: str

    def files(self) -> dict[str, bytes]:
        """Every file, checksums verified again: a staged tree could have been edited."""
        out: dict[str, bytes] = {}
        for entry in self.manifest.files:
            path = self.directory / entry.path
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise StagingError(f"staged {self.name}: {entry.path} is missing") from None
            verify(entry, data)
            out[entry.path] = data
        return out


def write_tree(target: Path, fetched: Fetched, extra: dict[str, object]) -> None:
    """Write into a temporary sibling, fsync, then swap it in with renames."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for entry in fetched.manifest.files:
            data = fetched.files[entry.path]
            verify(entry, data)
            (tmp / entry.path).write_bytes(data)
        (tmp / MANIFEST_NAME).write_text(fetched.manifest.model_dump_json(indent=2))
        (tmp / META).write_text(json.dumps({"source": fetched.source, **extra}))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(new: Path, target: Path) -> None:
    """Replace ``target`` by ``new``; at every instant one complete tree is at ``target`` or
    (briefly, between the two renames) in ``.old``, never a half-written one."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def clear_leftovers(root: Path) -> None:
    """Remove what a ``write_tree`` killed half-way left in ``root``: its temporary tree
    (``.NAME.*``, a new name each time, so never reused) and a ``.NAME.old`` whose ``NAME``
    exists. A ``.NAME.old`` alone is a complete tree caught between the two renames of
    ``swap_in``: it is put back. Only while holding the state lock, which every writer of
    ``root`` holds: then none of these belongs to a live process, whatever its age."""
    if not root.exists():
        return
    for path in root.iterdir():
        if not path.name.startswith("."):
            continue
        target = root / path.name[1:].removesuffix(".old")
        if path.name.endswith(".old") and _complete(path) and _restorable(target):
            os.rename(path, target)
        elif path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            # A leftover that cannot go must not stop the stage that found it.
            shutil.rmtree(path, ignore_errors=True)


def _restorable(target: Path) -> bool:
    try:
        check_name(target.name)
    except ValueError:
        return False
    return not target.exists()


def _complete(directory: Path) -> bool:
    return (
        not directory.is_symlink()
        and (directory / MANIFEST_NAME).is_file()
        and (directory / META).is_file()
    )


def stage(root: Path, name: str, fetched: Fetched) -> Staged:
    check_name(name)
    write_tree(root / name, fetched, {"staged_at": now()})
    return load(root, name)


def load(root: Path, name: str) -> Staged:
    check_name(name)
    directory = root / name
    try:
        manifest = Manifest.model_validate_json((directory / MANIFEST_NAME).read_bytes())
        meta = json.loads((directory / META).read_text())
    except FileNotFoundError:
        raise StagingError(f"nothing staged for {name!r}") from None
    return Staged(name, directory, manifest, meta.get("source", "?"), meta.get("staged_at", "?"))


def list_staged(root: Path) -> list[Staged]:
    if not root.exists():
        return []
    return [
        load(root, p.name)
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".")
    ]


def discard(root: Path, name: str) -> None:
    load(root, name)
    shutil.rmtree(root / name)
