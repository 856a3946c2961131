"""`leger secrets` on a real pseudo-terminal: the hidden prompt for put, and the typed-back
token that confirms a delete."""

from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import termios
import time

from legator.secrets.client import Client
from tests.secrets.conftest import LegerdThread
from tests.support import BIN


class Terminal:
    """A command whose controlling terminal is a pty we type into."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()

        def become_terminal_owner() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            preexec_fn=become_terminal_owner,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        )
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.seen)
            if found:
                return found
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        raise AssertionError(f"{pattern!r} not in {self.seen!r}")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self) -> int:
        code = self.proc.wait(timeout=30)
        os.close(self.master)
        return code


def test_put_prompts_without_echo_and_delete_wants_the_token(dev_legerd: LegerdThread) -> None:
    url = dev_legerd.url or ""
    term = Terminal("leger", "secrets", "--server", url, "put", "tty/secret")
    term.expect("Enter secret: ")
    term.type("typed-in-secret\n")
    term.expect("Confirm secret: ")
    term.type("typed-in-secret\n")
    term.expect("version 1")
    assert term.finish() == 0
    assert "typed-in-secret" not in term.seen  # never echoed
    with Client(url) as client:
        assert client.get("tty/secret") == (b"typed-in-secret", 1)

    mismatch = Terminal("leger", "secrets", "--server", url, "put", "tty/other")
    mismatch.expect("Enter secret: ")
    mismatch.type("one\n")
    mismatch.expect("Confirm secret: ")
    mismatch.type("two\n")
    mismatch.expect("do not match")
    assert mismatch.finish() == 2

    wrong = Terminal("leger", "secrets", "--server", url, "delete", "tty/secret")
    wrong.expect(r"Type ([0-9a-f]{6}) to confirm")
    wrong.type("nope\n")
    wrong.expect("did not match")
    assert wrong.finish() == 1
    right = Terminal("leger", "secrets", "--server", url, "delete", "tty/secret")
    token = right.expect(r"Type ([0-9a-f]{6}) to confirm").group(1)
    right.type(token + "\n")
    right.expect("deleted")
    assert right.finish() == 0
    with Client(url) as client:
        assert client.list() == []
