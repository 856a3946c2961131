"""One leger operation at a time per state directory: an exclusive ``flock`` on ``STATE/.lock``.

``flock`` rather than a lock file that is created and deleted: the kernel drops the lock when
the holder exits or crashes, so a killed ``leger`` never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_TIMEOUT = 300.0


class LockTimeout(RuntimeError):
    """Another leger operation held the lock for longer than the timeout."""


@contextmanager
def state_lock(
    state: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    waiting: Callable[[], None] = lambda: None,
) -> Iterator[None]:
    """Hold the exclusive lock of ``state`` for the body; wait up to ``timeout`` seconds for it
    (``waiting`` is called once when another operation holds it)."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    waiting()
                    told = True
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"another leger operation is still running (it holds {path}); "
                        f"gave up after {timeout:g} s, try again when it has finished"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
