"""Self-update: download the new zipapp, check its SHA-256, swap it in atomically."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from pathlib import Path

from legator.fleet.protocol import UpdateSpec

MAX_SIZE = 200 * 1024 * 1024


class UpdateRefused(Exception):
    pass


def current_zipapp() -> Path | None:
    """The .pyz this probe runs from, if it runs from one."""
    candidate = Path(sys.argv[0]).resolve()
    return candidate if candidate.suffix == ".pyz" and candidate.is_file() else None


def apply(spec: UpdateSpec, target: Path | None) -> Path:
    if not spec.url.startswith(("http://", "https://")):
        raise UpdateRefused(f"update URL {spec.url!r} must be http(s)")
    with urllib.request.urlopen(spec.url, timeout=60) as response:  # noqa: S310 - checked above
        data = response.read(MAX_SIZE + 1)
    if len(data) > MAX_SIZE:
        raise UpdateRefused("update is larger than 200 MiB")
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise UpdateRefused(f"checksum mismatch: expected {spec.sha256}, downloaded {digest}")
    if target is None:
        raise UpdateRefused("this probe does not run from a zipapp; update it with its package")
    tmp = target.with_suffix(".pyz.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return target


def reexec() -> None:
    os.execv(sys.executable, [sys.executable, *sys.argv])  # noqa: S606 - same program, new code
