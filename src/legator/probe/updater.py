"""Self-update: download the new zipapp, check its SHA-256, swap it in atomically."""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.request
from pathlib import Path

from legator.fleet.protocol import UpdateSpec

MAX_SIZE = 200 * 1024 * 1024
# The socket timeout bounds each read, not the download: a server sending a byte a minute
# would hold it (and refuse every later update) for good.
DOWNLOAD_TIMEOUT_S = 300.0


class UpdateRefused(Exception):
    pass


def current_zipapp() -> Path | None:
    """The .pyz this probe runs from, if it runs from one."""
    candidate = Path(sys.argv[0]).resolve()
    return candidate if candidate.suffix == ".pyz" and candidate.is_file() else None


def apply(spec: UpdateSpec, target: Path | None) -> Path:
    if not spec.url.startswith(("http://", "https://")):
        raise UpdateRefused(f"update URL {spec.url!r} must be http(s)")
    data = _download(spec.url)
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


def _download(url: str) -> bytes:
    deadline = time.monotonic() + DOWNLOAD_TIMEOUT_S
    data = bytearray()
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - checked by apply
        while piece := response.read1(1024 * 1024):
            data += piece
            if len(data) > MAX_SIZE:
                raise UpdateRefused("update is larger than 200 MiB")
            if time.monotonic() > deadline:
                raise UpdateRefused(f"update download took over {DOWNLOAD_TIMEOUT_S:g}s")
    return bytes(data)


def reexec() -> None:
    os.execv(sys.executable, [sys.executable, *sys.argv])  # noqa: S606 - same program, new code
