"""A stand-in for what sits in front of a control plane and is not it: a sign-in proxy that
answers every path with an HTML page (200) or a redirect, and a server that breaks a stream
off half-way. For the CLIs' one-line errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support import free_port

SIGN_IN_PAGE = b"<!doctype html><html><body><form>Sign in</form></body></html>"
STREAM_URL = "/api/v1/fleet/streams/broken"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        if path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("location", "https://sso.example/login")
            self.send_header("content-length", "0")
            self.end_headers()
        elif path.endswith("/command"):  # `legator run`: started; its stream breaks off
            body = json.dumps({"id": "cmd-1", "stream_url": STREAM_URL}).encode()
            self.send_response(202)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == STREAM_URL:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            self.wfile.write(b'1a\r\nevent: stdout\ndata: {"dat')  # and the peer is gone
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(SIGN_IN_PAGE)))
            self.end_headers()
            self.wfile.write(SIGN_IN_PAGE)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _answer

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def fake_proxy() -> Iterator[str]:
    """A running stand-in; yields its URL. ``URL/redirect/…`` answers 302 to a sign-in page."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_url() -> str:
    """The URL of a loopback port nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"
