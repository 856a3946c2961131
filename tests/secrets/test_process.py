"""`legerd serve` as a real process with its real flags: Tailscale identity through the
configured LocalAPI socket, the policy file, and a policy reload on SIGHUP."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.secrets.conftest import SETEC_HEADERS, FakeTailscale, whois_user
from tests.secrets.test_identity import call_as
from tests.support import BIN, free_port


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def test_legerd_process_identity_policy_and_reload(
    tmp_path: Path, shared_dir: Path, tailscale: FakeTailscale
) -> None:
    acl = tmp_path / "acl.json"
    acl.write_text(json.dumps([{"principal": "unix:nobody", "action": ["get"], "secret": ["a/*"]}]))
    tailscale.identities["127.0.0.2"] = whois_user(
        "carol@example.com", [{"action": ["put", "get"], "secret": ["a/*", "b/*"]}]
    )
    port, sock = free_port(), shared_dir / "legerd.sock"
    proc = subprocess.Popen(
        [
            str(BIN / "legerd"),
            "serve",
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            f"127.0.0.1:{port}",
            "--socket",
            str(sock),
            "--tailscale-socket",
            str(tailscale.path),
            "--acl",
            str(acl),
        ],
        env={**os.environ, "LEGERD_KEK": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "legerd did not start"
            time.sleep(0.05)
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", transport=transport, headers=SETEC_HEADERS
        ) as carol:
            for name in ("a/one", "b/two"):
                assert carol.post("/api/put", json={"Name": name, "Value": b64(b"v")}).json() == 1
        assert call_as("nobody", sock, "get", {"Name": "a/one"})[0] == 200
        assert call_as("nobody", sock, "get", {"Name": "b/two"})[0] == 403

        acl.write_text(
            json.dumps([{"principal": "unix:nobody", "action": ["get"], "secret": ["b/*"]}])
        )
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while call_as("nobody", sock, "get", {"Name": "b/two"})[0] != 200:
            assert time.monotonic() < deadline, "the policy was not reloaded"
            time.sleep(0.1)
        assert call_as("nobody", sock, "get", {"Name": "a/one"})[0] == 403

        acl.write_text("[not json")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None  # a bad file does not stop the daemon...
        assert call_as("nobody", sock, "get", {"Name": "b/two"})[0] == 200  # ...or its rules
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0
    assert "policy reload failed" in output and not sock.exists()
