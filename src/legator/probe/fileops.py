"""Read-only file operations, confined to the policy's paths after resolving symlinks and
``..`` (a link inside an allowed root that points outside it is refused).

Whatever the policy allows, the probe never serves its own credentials: its ``probe.yaml``
(the file it loaded, the default locations, and the temporary file a key rotation writes), nor
any process's environment or memory under ``/proc`` (``environ``, ``mem``, ``pagemap``) or
``/proc/kcore``. Paths are compared after resolving symlinks and ``..``, and files by device
and inode as well, so a symlink, a hard link or a bind mount of ``probe.yaml`` is refused
too. A *copy* of the file is another file and cannot be recognised.

The check is on a path, the read on a file, and a local user who can write inside an allowed
root could swap a component for a symlink in between (a race). So the file is opened one
component at a time from ``/`` with ``O_NOFOLLOW`` (a symlink met on the way fails the
operation), and what was opened is checked again before anything is read from it: its device
and inode against the credentials files, and the kernel's name for it
(``/proc/self/fd/N``) against the allowed roots and procfs's secrets."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import signal
import stat as stat_mod
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from legator.fleet.protocol import FileRequest
from legator.probe.config import CONFIG_NAME, DEFAULT_CONFIG_DIR, default_config_dir
from legator.probe.jsonfit import MAX_ANSWER_CHARS, encoded_len, fit

MAX_SEARCH_HITS = 1000
SEARCH_TIMEOUT_S = 20.0  # under the 30 s the control plane waits for the answer
# ``readlines`` reads every line before ``start``: a far one in a huge (or sparse) file is a
# scan of hours, so the scan stops after this long, with what it found or an error.
READLINES_TIMEOUT_S = 10.0
_SEARCH_CHILD = "import sys, legator.probe.fileops as f; f.search_child(sys.stdin.read())"
# Per-process files under procfs that hold secrets: the environment (enrolment tokens, API
# keys), the memory itself and the physical page map. ``cmdline``, ``status``, ``maps`` and
# the rest stay readable for diagnosis.
PROC_SECRET_NAMES = frozenset({"environ", "mem", "pagemap"})
PROC_SECRET_TOP = frozenset({"kcore"})  # all physical memory, as an ELF core file
# The kernel's log queue: a regular file whose read blocks until the kernel logs something
# and takes each message it returns away from the system's logger.
PROC_QUEUE_TOP = frozenset({"kmsg"})


class FileDenied(Exception):
    pass


def _within(real: Path, roots: Sequence[str]) -> bool:
    for root in roots:
        root_real = Path(os.path.realpath(root))
        if real == root_real or root_real in real.parents:
            return True
    return False


def resolve_allowed(path: str, roots: Sequence[str]) -> Path:
    if not path.startswith("/"):
        raise FileDenied(f"path {path!r} must be absolute")
    real = Path(os.path.realpath(path))
    if _within(real, roots):
        return real
    raise FileDenied(
        f"{path!r} (resolved to {str(real)!r}) is outside the allowed paths: "
        f"{', '.join(roots) or 'none'}"
    )


_O_PATH = getattr(os, "O_PATH", 0)  # Linux
# Directories on the way are opened only to be walked through.
_WALK = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | (_O_PATH or os.O_RDONLY)
# What is read: never a symlink, never waiting on a FIFO, never a controlling terminal.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
# What is only looked at (stat): O_PATH opens nothing for reading (no device's open runs);
# with O_NOFOLLOW a symlink there is opened as itself, and refused once opened.
_LOOK = os.O_NOFOLLOW | os.O_CLOEXEC | (_O_PATH or os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)


def _swapped(path: str, where: str) -> FileDenied:
    return FileDenied(
        f"{path!r} changed while the probe was opening it ({where!r} is now a symbolic "
        "link): refused"
    )


def open_nofollow(path: str, real: Path, flags: int) -> int:
    """Open ``real`` (resolved: no symlink, no ``..``) one component at a time from ``/``,
    each with ``O_NOFOLLOW``, so the file opened is the one at that very path: a component
    swapped for a symlink since it was resolved and checked fails the open (a race), where
    ``open(real)`` would follow it out of the allowed paths."""
    parts = real.parts[1:]
    fd = os.open("/", _WALK if parts else flags)
    walked = Path("/")
    for index, name in enumerate(parts):
        last = index == len(parts) - 1
        walked = walked / name
        try:
            fd_next = os.open(name, flags if last else _WALK, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                with contextlib.suppress(OSError):
                    if stat_mod.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise _swapped(path, str(walked)) from None
            raise OSError(exc.errno, exc.strerror, path) from None  # named as asked
        finally:
            os.close(fd)
        fd = fd_next
    return fd


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
        if len(inside) == 1 and inside[0] in PROC_QUEUE_TOP:
            raise FileDenied(
                f"{path!r} (resolved to {str(real)!r}) is the kernel's log queue (a read "
                "waits for messages and takes them from the system's logger): the probe "
                "never serves it, whatever the policy allows"
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


def _check_opened(
    path: str, real: Path, fd: int, roots: Sequence[str], secrets: Secrets
) -> os.stat_result:
    """The same checks on what was actually opened, so a path swapped between the check
    above and the open still cannot reach a file outside the allowed paths, the config or a
    process's secrets. Its ``fstat``."""
    info = os.fstat(fd)
    if stat_mod.S_ISLNK(info.st_mode):  # the last component, opened as itself (O_PATH)
        raise _swapped(path, str(real))
    if (info.st_dev, info.st_ino) in secrets.identities:
        raise _refuse_own_file(path, real)
    try:  # the kernel's name for the open file (none without procfs)
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return info
    if opened.is_absolute():
        _check_proc(path, opened, secrets.proc_mounts)
        if not _within(opened, roots):
            raise FileDenied(
                f"{path!r} changed while the probe was opening it (what it opened is "
                f"{str(opened)!r}, outside the allowed paths): refused"
            )
    return info


@contextlib.contextmanager
def _opened(
    path: str, real: Path, flags: int, roots: Sequence[str], secrets: Secrets
) -> Iterator[tuple[int, os.stat_result]]:
    fd = open_nofollow(path, real, flags)
    try:
        yield fd, _check_opened(path, real, fd, roots, secrets)
    finally:
        os.close(fd)


def perform(
    request: FileRequest, roots: Sequence[str], config_path: Path | str | None = None
) -> Any:
    """Run one file operation. ``config_path`` is where this probe loaded its config from;
    it and the default locations are refused whatever ``roots`` allow."""
    target = resolve_allowed(request.path, roots)
    if request.op == "search":
        _pattern(request.pattern)  # a pattern that does not compile is refused before anything
    secrets = Secrets.of(config_path)
    check_not_secret(request.path, target, secrets)
    if request.op == "stat":
        with _opened(request.path, target, _LOOK, roots, secrets) as (_fd, info):
            pass
        return {
            "path": str(target),
            "type": "dir" if stat_mod.S_ISDIR(info.st_mode) else "file",
            "size": info.st_size,
            "mode": oct(stat_mod.S_IMODE(info.st_mode)),
            "uid": info.st_uid,
            "gid": info.st_gid,
            "mtime": info.st_mtime,
        }
    with _opened(request.path, target, _READ, roots, secrets) as (fd, info):
        if not stat_mod.S_ISREG(info.st_mode):
            raise FileDenied(f"{request.path!r} is not a regular file")
        os.set_blocking(fd, True)
        if request.op == "search":
            return _search(request, fd)
        return _read(request, fd)


def _pattern(pattern: str | None) -> re.Pattern[str]:
    try:
        return re.compile(pattern or "")
    except re.error as exc:  # not a ValueError: it would end the request without an answer
        raise ValueError(f"search pattern {pattern!r} does not compile: {exc}") from None


@dataclass
class _Scan:
    """How far one read of lines may go in time, how many it read, and whether it stopped
    for lack of time."""

    stop_at: float
    lines: int = 0
    out_of_time: bool = False

    def expired(self) -> bool:
        self.out_of_time = self.out_of_time or time.monotonic() >= self.stop_at
        return self.out_of_time


def _lines(handle: TextIO, limit: int, scan: _Scan | None = None) -> Iterator[tuple[str, bool]]:
    """The file's lines without their newline, each cut to ``limit`` characters, and whether
    it was cut. The rest of a longer line is read in pieces and dropped, never held whole: a
    sparse file of one enormous line costs whoever writes it no disk. With ``scan``, the
    lines end where its time does (a line being read then ends there, cut)."""
    while piece := handle.readline(limit + 1):
        text, cut = piece.removesuffix("\n")[:limit], False
        while len(piece) > limit and not piece.endswith("\n"):
            cut = True
            if scan is not None and scan.expired():
                break
            piece = handle.readline(limit + 1)
        if scan is not None:
            scan.lines += 1
        yield text, cut
        if scan is not None and scan.expired():
            return


def _bounded(
    rows: Iterable[tuple[int, tuple[str, bool]]], max_bytes: int, max_rows: int, row_chars: int
) -> tuple[list[tuple[int, str]], bool]:
    """The numbered lines of ``rows`` that fit in ``max_bytes`` characters (a line counts one
    more, for its newline), in ``MAX_ANSWER_CHARS`` once encoded (a line counts
    ``row_chars`` more, for what the answer puts around it) and in ``max_rows``, and whether
    anything was left out."""
    kept: list[tuple[int, str]] = []
    budget, wire, truncated = max_bytes, MAX_ANSWER_CHARS, False
    for number, (text, cut) in rows:
        if not budget or wire <= row_chars or len(kept) >= max_rows:
            return kept, True
        part = fit(text[: budget - 1], wire - row_chars)
        budget -= len(part) + 1
        wire -= encoded_len(part) + row_chars
        truncated = truncated or cut or len(part) < len(text)
        kept.append((number, part))
    return kept, truncated


def _read(request: FileRequest, fd: int) -> Any:
    """``read`` or ``readlines`` of ``fd``, a regular file opened and checked (the caller
    closes it): at most ``max_bytes`` of it, and whether some was left out."""
    if request.op == "read":
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(request.max_bytes + 1)
        text = data[: request.max_bytes].decode("utf-8", "replace")
        content = fit(text, MAX_ANSWER_CHARS)
        return {
            "content": content,
            "truncated": len(data) > request.max_bytes or len(content) < len(text),
        }
    end = request.end or request.start + 999
    scan = _Scan(time.monotonic() + READLINES_TIMEOUT_S)
    with os.fdopen(fd, encoding="utf-8", errors="replace", closefd=False) as handle:
        numbered = enumerate(_lines(handle, request.max_bytes, scan), start=1)
        wanted = itertools.islice(numbered, request.start - 1, end)
        found, truncated = _bounded(wanted, request.max_bytes, end, row_chars=3)  # "",
    if scan.out_of_time and not found:
        raise ValueError(
            f"readlines of {request.path!r} stopped after {READLINES_TIMEOUT_S:g}s, "
            f"{scan.lines} lines in, before reaching line {request.start}"
        )
    lines = [text for _, text in found]
    return {"start": request.start, "lines": lines, "truncated": truncated or scan.out_of_time}


def _search(request: FileRequest, fd: int) -> Any:
    """``search`` of ``fd`` in a child process, killed after ``SEARCH_TIMEOUT_S``.

    ``re`` backtracks and holds the GIL for the whole of one match, so a pattern such as
    ``(a+)+$`` against a line of a's would freeze the probe itself (heartbeats, commands,
    every other request) for good. The child reads the file through the descriptor opened
    and checked here, and gets nothing of the probe's environment."""
    job = {"fd": fd, "pattern": request.pattern or "", "max_bytes": request.max_bytes}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SEARCH_CHILD],
            input=json.dumps(job),
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            timeout=SEARCH_TIMEOUT_S,
            check=False,
            env={"PYTHONPATH": os.pathsep.join(path for path in sys.path if path)},
        )
    except subprocess.TimeoutExpired:
        raise ValueError(
            f"search of {request.path!r} stopped after {SEARCH_TIMEOUT_S:g}s (a pattern "
            "that backtracks without end, or a very large file)"
        ) from None
    if done.returncode != 0:
        raise ValueError(f"search of {request.path!r} failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout)


def search_child(job_text: str) -> None:
    """The child's side of :func:`_search`: the matches, as JSON on stdout."""
    # The probe kills the child at its timeout, unless the probe is gone first (killed,
    # crashed, re-executed by an update): then the kernel does, a little later.
    signal.alarm(int(SEARCH_TIMEOUT_S) + 5)
    job = json.loads(job_text)
    pattern = _pattern(job["pattern"])
    with os.fdopen(job["fd"], encoding="utf-8", errors="replace") as handle:
        numbered = enumerate(_lines(handle, job["max_bytes"]), start=1)
        matching = (row for row in numbered if pattern.search(row[1][0]))
        found, truncated = _bounded(matching, job["max_bytes"], MAX_SEARCH_HITS, row_chars=40)
    hits = [{"line": number, "text": text} for number, text in found]
    sys.stdout.write(json.dumps({"matches": hits, "truncated": truncated}))
