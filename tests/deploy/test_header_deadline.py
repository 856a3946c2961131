"""An answer's status line and headers count against ``REQUEST_DEADLINE`` as its body does.
A server that drips its head a byte at a time never trips the per-read timeout (30 s for
leger), and h11 accepts up to 64 KiB of head: at one byte every 20 s that held leger (or a
timer's `leger deploy update`, or a program polling legerd) for days. The stand-in here is
a real HTTP server on a real socket, over TCP and over a Unix socket as legerd's clients
use."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from legator.core import bounded_http
from legator.core.bounded_http import BodyTooSlow, bounded_request
from legator.deploy.client import ControlPlane, ControlPlaneError, Login
from tests.support import free_port

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-pad: " + b"p" * 200 + b"\r\n"
DRIP = 0.2  # seconds between two bytes of the head: the whole head takes about 45 s
DEADLINE = 2.0


@dataclass
class Dripper:
    """Answers every request on a connection: dripped (``drip`` seconds a byte) while
    ``dripping`` is set, else at once, with keep-alive."""

    drip: float = DRIP
    dripping: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    hung_up: threading.Event = field(default_factory=threading.Event)

    def serve(self, conn: socket.socket) -> None:
        with conn, suppress(OSError):
            while _read_request(conn):
                if self.dripping.is_set():
                    self._drip(conn)
                    return
                body = b'{"ok": true}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )

    def _drip(self, conn: socket.socket) -> None:
        try:
            for byte in HEAD:
                conn.sendall(bytes([byte]))
                self.sent += 1
                time.sleep(self.drip)
            conn.sendall(b"content-length: 2\r\n\r\n{}")
        except OSError:
            self.hung_up.set()


def _read_request(conn: socket.socket) -> bool:
    """Read one request's head (the requests here have no body); False once closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return False
        data += chunk
    return True


@contextmanager
def serving(listener: socket.socket, dripper: Dripper) -> Iterator[None]:
    def accept() -> None:
        with suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=dripper.serve, args=(conn,), daemon=True).start()

    listener.listen()
    threading.Thread(target=accept, daemon=True).start()
    try:
        yield
    finally:
        listener.close()


@contextmanager
def tcp_dripper(dripper: Dripper) -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    with serving(listener, dripper):
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bounded_http, "REQUEST_DEADLINE", DEADLINE)


def timed_failure(call: object) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises((BodyTooSlow, ControlPlaneError)) as caught:
        call()  # type: ignore[operator]
    return caught.value, time.monotonic() - started


@pytest.mark.usefixtures("short_deadline")
def test_a_dripped_head_is_given_up_at_the_deadline_by_leger() -> None:
    """Through leger's control-plane client, as ``config pull`` calls it."""
    dripper = Dripper()
    dripper.dripping.set()
    with tcp_dripper(dripper) as url:
        login = Login(url, "lgk_" + "0" * 64, "api_key", "admin", None, None, "2026-01-01")
        with ControlPlane(login) as api:
            error, took = timed_failure(lambda: api.get_json("/api/v1/deploy/configs/latest"))
        assert dripper.hung_up.wait(10), "the server was never hung up on"
    assert isinstance(error, ControlPlaneError)
    assert str(error) == (
        f"GET /api/v1/deploy/configs/latest: no complete answer within {DEADLINE:g} s; gave up"
    )
    # Generous: the dripped head alone takes about 45 s; the deadline is 2 s.
    assert took < 20, f"gave up after {took:.1f} s"
    assert dripper.sent < len(HEAD)


@pytest.mark.usefixtures("short_deadline")
def test_the_deadline_covers_a_unix_socket_and_leaves_the_next_call_alone(
    tmp_path: Path,
) -> None:
    """legerd's clients speak HTTP over a Unix socket. On the same client and connection
    pool, an answer that comes at once is still read after one given up, and a request made
    without ``bounded_request`` keeps only the client's own timeout."""
    dripper = Dripper()
    path = tmp_path / "d.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    transport = httpx.HTTPTransport(uds=str(path))
    with serving(listener, dripper), httpx.Client(transport=transport, base_url="http://x") as http:
        assert bounded_request(http, "GET", "/first", limit=100).json() == {"ok": True}
        dripper.dripping.set()
        error, took = timed_failure(lambda: bounded_request(http, "GET", "/slow", limit=100))
        assert str(error) == f"GET /slow: no complete answer within {DEADLINE:g} s; gave up"
        assert took < 20, f"gave up after {took:.1f} s"
        dripper.dripping.clear()
        assert bounded_request(http, "GET", "/again", limit=100).json() == {"ok": True}
        # Past the deadline of the request given up, without one of its own.
        time.sleep(DEADLINE)
        assert http.get("/plain").json() == {"ok": True}
