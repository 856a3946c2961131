"""Read-only file operations, confined to the policy's paths after resolving symlinks and
``..`` (a link inside an allowed root that points outside it is refused).

Whatever the policy allows, the probe never serves its own credentials: its ``probe.yaml``
(the file it loaded, the default locations, and the temporary file a key rotation writes), nor
any process's environment or memory under ``/proc`` (``environ``, ``mem``, ``pagemap``) or
``/proc/kcore``. Paths are compared after resolving symlinks and ``..``, and files by device
and inode as well, so a symlink, a hard link or a bind mount of ``probe.yaml`` is refused
too. A *copy* of the file is another file and cannot be recognised."""

from __future__ import annotations

import contextlib
import os
import re
import stat as stat_mod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from legator.fleet.protocol import FileRequest
from legator.probe.config import CONFIG_NAME, DEFAULT_CONFIG_DIR, default_config_dir

MAX_SEARCH_HITS = 1000
# Per-process files under procfs that hold secrets: the environment (enrolment tokens, API
# keys), the memory itself and the physical page map. ``cmdline``, ``status``, ``maps`` and
# the rest stay readable for diagnosis.
PROC_SECRET_NAMES = frozenset({"environ", "mem", "pagemap"})
PROC_SECRET_TOP = frozenset({"kcore"})  # all physical memory, as an ELF core file


class FileDenied(Exception):
    pass


def resolve_allowed(path: str, roots: Sequence[str]) -> Path:
    if not path.startswith("/"):
        raise FileDenied(f"path {path!r} must be absolute")
    real = Path(os.path.realpath(path))
    for root in roots:
        root_real = Path(os.path.realpath(root))
        if real == root_real or root_real in real.parents:
            return real
    raise FileDenied(
        f"{path!r} (resolved to {str(real)!r}) is outside the allowed paths: "
        f"{', '.join(roots) or 'none'}"
    )


def own_secret_files(config_path: Path | str | None = None) -> list[Path]:
    """The probe's credential files: the config it loaded (if known) and the default
    locations, each with the ``.tmp`` sibling that ``config.save`` writes first."""
    candidates = [DEFAULT_CONFIG_DIR / CONFIG_NAME]
    with contextlib.suppress(KeyError, RuntimeError):  # no home directory to speak of
        candidates.append(default_config_dir() / CONFIG_NAME)
    if config_path is not None:
        candidates.insert(0, Path(config_path))
    files: list[Path] = []
    for candidate in candidates:
        for path in (candidate, candidate.with_suffix(".tmp")):
            real = Path(os.path.realpath(path))
            if real not in files:
                files.append(real)
    return files


def _proc_mounts() -> set[Path]:
    """Where procfs is mounted (``/proc``, and any other mount of it, e.g. in a container)."""
    mounts = {Path("/proc")}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if "-" not in fields:
                    continue
                dash = fields.index("-")
                if len(fields) > dash + 1 and fields[dash + 1] == "proc" and len(fields) > 4:
                    point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                    mounts.add(Path(os.path.realpath(point)))
    except OSError:
        pass
    return mounts


def _identities(paths: Iterable[Path]) -> frozenset[tuple[int, int]]:
    found = set()
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        found.add((info.st_dev, info.st_ino))
    return frozenset(found)


@dataclass(frozen=True)
class Secrets:
    """What one file operation must not reach, looked up once for it: the probe's credential
    files (by real path and by device and inode) and where procfs is mounted."""

    files: tuple[Path, ...]
    identities: frozenset[tuple[int, int]]
    proc_mounts: frozenset[Path]

    @classmethod
    def of(cls, config_path: Path | str | None = None) -> Secrets:
        files = tuple(own_secret_files(config_path))
        return cls(files, _identities(files), frozenset(_proc_mounts()))


def _refuse_own_file(path: str, real: Path) -> FileDenied:
    return FileDenied(
        f"{path!r} (resolved to {str(real)!r}) is the probe's own credentials file: "
        "the probe never serves it, whatever the policy allows"
    )


def _check_proc(path: str, real: Path, mounts: frozenset[Path]) -> None:
    for mount in mounts:
        if mount not in real.parents:
            continue
        inside = real.relative_to(mount).parts
        if real.name in PROC_SECRET_NAMES or (len(inside) == 1 and inside[0] in PROC_SECRET_TOP):
            raise FileDenied(
                f"{path!r} (resolved to {str(real)!r}) holds a process's environment or "
                "memory: the probe never serves it, whatever the policy allows"
            )


def check_not_secret(path: str, real: Path, secrets: Secrets) -> None:
    """Refuse, whatever the policy says, the probe's own config and processes' secrets."""
    if real in secrets.files:
        raise _refuse_own_file(path, real)
    _check_proc(path, real, secrets.proc_mounts)
    try:
        info = os.stat(real)
    except OSError:
        return  # nothing there: the operation fails on its own
    if (info.st_dev, info.st_ino) in secrets.identities:
        raise _refuse_own_file(path, real)  # a hard link or a bind mount of it


def _check_opened(path: str, real: Path, fd: int, secrets: Secrets) -> None:
    """The same checks on what was actually opened, so a path swapped between the check
    above and the open still cannot reach the config or a process's secrets."""
    info = os.fstat(fd)
    if (info.st_dev, info.st_ino) in secrets.identities:
        raise _refuse_own_file(path, real)
    with contextlib.suppress(OSError):  # the kernel's name for the open file
        _check_proc(path, Path(os.readlink(f"/proc/self/fd/{fd}")), secrets.proc_mounts)


def perform(
    request: FileRequest, roots: Sequence[str], config_path: Path | str | None = None
) -> Any:
    """Run one file operation. ``config_path`` is where this probe loaded its config from;
    it and the default locations are refused whatever ``roots`` allow."""
    target = resolve_allowed(request.path, roots)
    secrets = Secrets.of(config_path)
    check_not_secret(request.path, target, secrets)
    if request.op == "stat":
        info = target.stat()
        return {
            "path": str(target),
            "type": "dir" if stat_mod.S_ISDIR(info.st_mode) else "file",
            "size": info.st_size,
            "mode": oct(stat_mod.S_IMODE(info.st_mode)),
            "uid": info.st_uid,
            "gid": info.st_gid,
            "mtime": info.st_mtime,
        }
    if not target.is_file():
        raise FileDenied(f"{request.path!r} is not a regular file")
    if request.op == "read":
        with target.open("rb") as handle:
            _check_opened(request.path, target, handle.fileno(), secrets)
            data = handle.read(request.max_bytes + 1)
        return {
            "content": data[: request.max_bytes].decode("utf-8", "replace"),
            "truncated": len(data) > request.max_bytes,
        }
    if request.op == "readlines":
        lines, end = [], request.end or request.start + 999
        with target.open(encoding="utf-8", errors="replace") as handle:
            _check_opened(request.path, target, handle.fileno(), secrets)
            for number, line in enumerate(handle, start=1):
                if number > end:
                    break
                if number >= request.start:
                    lines.append(line.rstrip("\n"))
        return {"start": request.start, "lines": lines}
    pattern = re.compile(request.pattern or "")
    hits = []
    with target.open(encoding="utf-8", errors="replace") as handle:
        _check_opened(request.path, target, handle.fileno(), secrets)
        for number, line in enumerate(handle, start=1):
            if pattern.search(line):
                hits.append({"line": number, "text": line.rstrip("\n")})
                if len(hits) >= MAX_SEARCH_HITS:
                    break
    return {"matches": hits}
