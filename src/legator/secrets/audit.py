"""The audit log: one JSON line per access (time, principal, action, secret, version,
authorized), appended to a file created 0600. An existing file keeps the mode its admin gave
it (e.g. 0640 for a log shipper's group), unless others may read or write it: start-up then
takes those bits away, and logs so.

Every record is written to the file before the request is answered, so it survives the
process being killed. Records of changes are also fsynced before the change commits. Records
of reads are fsynced by a background flusher within ``flush_interval`` seconds: an fsync
costs milliseconds on ordinary disks, and paying it on every read would make a get ten times
slower than its target.

The file is rotated by size (``audit.log.1`` … ``.N``, the standard library's scheme) and
reopened on request (SIGHUP, after an external logrotate renamed it). A line is never split
between two files, and a file is synced whole before it is closed: the flusher only ever syncs
the file that is current.
"""

from __future__ import annotations

import io
import json
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, Protocol

from legator.core.logging import get_logger

log = get_logger("legerd")
MAX_BYTES_ENV, KEEP_ENV = "LEGERD_AUDIT_MAX_BYTES", "LEGERD_AUDIT_KEEP"


@dataclass(frozen=True)
class AuditRotation:
    # At the default request rate one source adds about 0.8 GB a day: a file every few hours.
    max_bytes: int = 100 * 1024 * 1024  # 0: never by size (an external logrotate does it)
    keep: int = 10  # rotated files kept besides audit.log

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AuditRotation:
        """Raises ValueError naming the variable for a bad value."""
        default = cls()
        return cls(
            _integer(env, MAX_BYTES_ENV, default.max_bytes, minimum=0),
            _integer(env, KEEP_ENV, default.keep, minimum=1),
        )


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    if name not in env:
        return default
    text = env[name].strip()
    if not text.isdigit() or int(text) < minimum:
        raise ValueError(f"{name}={env[name]!r}: expected an integer >= {minimum}")
    return int(text)


class AuditSink(Protocol):
    def record(
        self,
        *,
        principal: str,
        action: str,
        secret: str,
        version: int,
        authorized: bool,
        durable: bool = False,
        **extra: Any,
    ) -> None: ...


class _AuditFile(RotatingFileHandler):
    """The standard library's size rotation, over an unbuffered O_APPEND binary file: one
    write() per line. Used for its files only, never as a logging handler; the caller holds
    AuditLog's lock around every method."""

    def __init__(self, path: Path, rotation: AuditRotation) -> None:
        self.create_mode = 0o600  # of the next file created: that of the one it replaces
        super().__init__(
            path, maxBytes=rotation.max_bytes, backupCount=rotation.keep, encoding="utf-8"
        )

    @property
    def fd(self) -> int:
        return self.stream.fileno()

    def _open(self) -> io.FileIO:  # type: ignore[override]
        while True:
            try:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                fd = os.open(self.baseFilename, flags, 0o600)
            except FileExistsError:
                try:
                    # Made by logrotate's `create`: its mode and owner are the admin's choice.
                    fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND)
                except FileNotFoundError:
                    continue
            else:
                os.fchmod(fd, self.create_mode)  # os.open's mode would be cut by the umask
            return io.FileIO(fd, "ab")

    def append(self, line: bytes) -> None:
        if self.maxBytes > 0:
            size = os.lseek(self.fd, 0, os.SEEK_END)
            if size and size + len(line) > self.maxBytes:
                self.doRollover()
        os.write(self.fd, line)

    def doRollover(self) -> None:
        self._retire()
        try:
            super().doRollover()
        finally:
            if self.stream is None:  # a rename failed: go on in audit.log, whatever it is
                self.stream = self._open()
        _sync_directory(Path(self.baseFilename).parent)  # the renames survive a crash

    def reopen(self) -> None:
        self.create_mode = stat.S_IMODE(os.fstat(self.fd).st_mode)
        fresh = self._open()  # before the close: a failure leaves the current file in use
        self._retire()
        self.stream = fresh

    def _retire(self) -> None:
        """Sync the current file whole and note its mode, then close it."""
        os.fdatasync(self.fd)
        self.create_mode = stat.S_IMODE(os.fstat(self.fd).st_mode)
        self.stream.close()


def keep_from_others(fd: int, path: Path) -> None:
    """Take away the access of users outside the file's owner and group: the lines name every
    caller and secret. The owner's and group's bits are the admin's choice and are kept."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & stat.S_IRWXO:
        os.fchmod(fd, mode & ~stat.S_IRWXO)
        log.warning(
            "audit log was open to other users; their access removed",
            path=str(path),
            mode=f"{mode:04o}",
            new_mode=f"{mode & ~stat.S_IRWXO:04o}",
        )


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    def __init__(
        self,
        path: Path,
        flush_interval: float = 0.2,
        rotation: AuditRotation | None = None,
    ) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _AuditFile(path, rotation or AuditRotation())
        keep_from_others(self._file.fd, path)
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._closed = False
        self._stop = threading.Event()
        self._interval = flush_interval
        self._flusher = threading.Thread(target=self._flush_loop, name="audit-fsync", daemon=True)
        self._flusher.start()

    def record(
        self,
        *,
        principal: str,
        action: str,
        secret: str,
        version: int,
        authorized: bool,
        durable: bool = False,
        **extra: Any,
    ) -> None:
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "principal": principal,
            "action": action,
            "secret": secret,
            "version": version,
            "authorized": authorized,
            **extra,
        }
        line = (json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n").encode()
        with self._lock:
            # One write() of an O_APPEND fd: lines from threads never interleave.
            self._file.append(line)
            # A descriptor of its own: a rotation may close the file's meanwhile.
            written_to = os.dup(self._file.fd) if durable else -1
        # Synced outside the lock: reads record on the event loop, and must not wait out a
        # write's fdatasync (milliseconds, seconds under I/O pressure) for the lock.
        if durable:
            try:
                os.fdatasync(written_to)
            finally:
                os.close(written_to)
        else:
            self._dirty.set()

    def reopen(self) -> None:
        """Go on in a new file at ``path`` (after logrotate renamed the current one away)."""
        with self._lock:
            self._file.reopen()

    def _flush_loop(self) -> None:
        while not self._closed:
            self._dirty.wait()
            if self._closed:
                return
            self._dirty.clear()
            with self._lock:
                current = os.dup(self._file.fd)
            try:
                os.fdatasync(current)
            except OSError:
                return
            finally:
                os.close(current)
            self._stop.wait(self._interval)  # batch the reads that arrive meanwhile

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._dirty.set()
        self._flusher.join(timeout=5)
        with self._lock:
            os.fdatasync(self._file.fd)
            self._file.close()
