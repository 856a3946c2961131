"""The audit log: one JSON line per access (time, principal, action, secret, version,
authorized), appended to a 0600 file.

Every record is written to the file before the request is answered, so it survives the
process being killed. Records of changes are also fsynced before the change commits. Records
of reads are fsynced by a background flusher within ``flush_interval`` seconds: an fsync
costs milliseconds on ordinary disks, and paying it on every read would make a get ten times
slower than its target.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol


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


class AuditLog:
    def __init__(self, path: Path, flush_interval: float = 0.2) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)
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
            os.write(self._fd, line)
        # Synced outside the lock: reads record on the event loop, and must not wait out a
        # write's fdatasync (milliseconds, seconds under I/O pressure) for the lock.
        if durable:
            os.fdatasync(self._fd)
        else:
            self._dirty.set()

    def _flush_loop(self) -> None:
        while not self._closed:
            self._dirty.wait()
            if self._closed:
                return
            self._dirty.clear()
            try:
                os.fdatasync(self._fd)
            except OSError:
                return
            self._stop.wait(self._interval)  # batch the reads that arrive meanwhile

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._dirty.set()
        self._flusher.join(timeout=5)
        with self._lock:
            os.fdatasync(self._fd)
            os.close(self._fd)
