"""Read-only file operations, confined to the policy's paths after resolving symlinks and
``..`` (a link inside an allowed root that points outside it is refused)."""

from __future__ import annotations

import os
import re
import stat as stat_mod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from legator.fleet.protocol import FileRequest

MAX_SEARCH_HITS = 1000


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


def perform(request: FileRequest, roots: Sequence[str]) -> Any:
    target = resolve_allowed(request.path, roots)
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
            data = handle.read(request.max_bytes + 1)
        return {
            "content": data[: request.max_bytes].decode("utf-8", "replace"),
            "truncated": len(data) > request.max_bytes,
        }
    if request.op == "readlines":
        lines, end = [], request.end or request.start + 999
        with target.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if number > end:
                    break
                if number >= request.start:
                    lines.append(line.rstrip("\n"))
        return {"start": request.start, "lines": lines}
    pattern = re.compile(request.pattern or "")
    hits = []
    with target.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if pattern.search(line):
                hits.append({"line": number, "text": line.rstrip("\n")})
                if len(hits) >= MAX_SEARCH_HITS:
                    break
    return {"matches": hits}
