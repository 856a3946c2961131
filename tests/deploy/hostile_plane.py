"""A stand-in for a hostile or broken control plane: it speaks the Deploy API's paths but
answers with bodies far longer than they should be, and counts what it managed to send."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support import free_port

FILE = b"[Container]\nImage=localhost/x:1\n"
CHUNK = b"x" * (64 * 1024)
JSON = "application/json"


@dataclass
class Plan:
    """What the stand-in answers. ``flood``: bytes sent as the body of the answer it floods
    (``flood_path``), with no length and endless-looking JSON; ``declared``: the size the
    manifest gives ``app.container``; ``status``: the flooded answer's status; ``drip``:
    seconds between the flood's bytes, sent one at a time (0: as fast as it can)."""

    flood: int
    flood_path: str
    declared: int = len(FILE)
    status: int = 200
    drip: float = 0
    sent: int = 0
    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _manifest(declared: int) -> bytes:
    entry = {"path": "app.container", "sha256": hashlib.sha256(FILE).hexdigest(), "size": declared}
    return json.dumps(
        {"version": 1, "created_at": "2026-01-01T00:00:00Z", "files": [entry], "services": ["app"]}
    ).encode()


def _handler(plan: Plan) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            with plan.lock:
                plan.paths.append(path)
            if path == plan.flood_path:
                self._flood()
            elif path.endswith("/manifest.json"):
                self._answer(_manifest(plan.declared), "application/json")
            elif path.endswith("/app.container"):
                self._answer(FILE, "text/plain")
            else:
                self._answer(b'{"error": {"message": "no such thing"}}', "application/json", 404)

        def do_POST(self) -> None:
            """Device sign-in: a grant that asks for polling without pause for 30 years, and
            a code nobody ever approves."""
            self.rfile.read(int(self.headers.get("content-length") or 0))
            path = self.path.split("?", 1)[0]
            with plan.lock:
                plan.paths.append(path)
            if path.endswith("/device/code"):
                grant = {"device_code": "dc", "user_code": "ABCD-EFGH", "interval": 0}
                self._answer(json.dumps({**grant, "expires_in": 10**9}).encode(), JSON)
            else:
                self._answer(b'{"status": "pending"}', JSON)

        def _answer(self, body: bytes, kind: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _flood(self) -> None:
            """No length: the body runs until the connection closes, as a broken proxy's may."""
            self.send_response(plan.status)
            self.send_header("content-type", "application/json")
            self.send_header("connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                self.wfile.write(b'{"pad": "')
                chunk = CHUNK[:1] if plan.drip else CHUNK
                while plan.sent < plan.flood:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    with plan.lock:
                        plan.sent += len(chunk)
                    time.sleep(plan.drip)
                self.wfile.write(b'"}')
            except (BrokenPipeError, ConnectionResetError):
                pass  # leger hung up: what it refused to read is not counted

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def hostile_plane(plan: Plan, handler: type[BaseHTTPRequestHandler] | None = None) -> Iterator[str]:
    """The running stand-in, answering with ``handler`` (the Deploy API's by default); yields
    its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler or _handler(plan))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
