"""Unix-socket callers are identified by SO_PEERCRED; --dev trusts loopback only."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from legator.core.auth.tailscale import WhoIs
from legator.secrets.server import ConfigProblem, Legerd
from tests.secrets.conftest import (
    FakeTailscale,
    LegerdThread,
    make_config,
    whois_tagged,
    whois_user,
)

# Runs as another user with nothing but the standard library: one setec call over the socket.
_CALL_AS_USER = r"""
import json, socket, sys
path, call, body = sys.argv[1], sys.argv[2], sys.argv[3].encode()
sock = socket.socket(socket.AF_UNIX)
sock.connect(path)
sock.sendall(
    f"POST /api/{call} HTTP/1.1\r\nHost: legerd\r\nContent-Type: application/json\r\n"
    f"Sec-X-Tailscale-No-Browsers: setec\r\nContent-Length: {len(body)}\r\n"
    "Connection: close\r\n\r\n".encode() + body
)
data = b""
while chunk := sock.recv(65536):
    data += chunk
head, _, payload = data.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": payload.decode()}))
"""


# The test's venv lives under root-only directories; the Debian interpreter is reachable.
OTHER_USER_PYTHON = (
    "/usr/bin/python3" if Path("/usr/bin/python3").exists() else shutil.which("python3")
)


def call_as(user: str, socket_path: Path, call: str, body: dict[str, object]) -> tuple[int, str]:
    result = subprocess.run(
        [OTHER_USER_PYTHON, "-I", "-c", _CALL_AS_USER, str(socket_path), call, json.dumps(body)],
        user=user,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd="/",
    )
    answer = json.loads(result.stdout)
    return answer["status"], answer["body"]


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def test_unix_socket_callers_get_their_own_namespace(legerd: LegerdThread) -> None:
    sock = legerd.config.socket_path
    assert sock is not None
    status, body = call_as(
        "nobody", sock, "put", {"Name": "leger/nobody/token", "Value": b64(b"t")}
    )
    assert (status, body) == (200, "1")
    status, body = call_as("nobody", sock, "get", {"Name": "leger/nobody/token"})
    assert status == 200 and json.loads(body)["Value"] == b64(b"t")
    status, body = call_as("nobody", sock, "put", {"Name": "leger/root/token", "Value": b64(b"t")})
    assert (status, body) == (403, "access denied\n")
    status, body = call_as("nobody", sock, "list", {})
    assert status == 200 and [i["Name"] for i in json.loads(body)] == ["leger/nobody/token"]
    # root (this test process) may do anything over the socket: it can read the key anyway.
    with legerd.unix() as root:
        assert root.post("/api/get", json={"Name": "leger/nobody/token"}).status_code == 200
        assert root.post("/api/put", json={"Name": "other", "Value": b64(b"o")}).json() == 1
    principals = {(e["principal"], e["transport"]) for e in legerd.audit_lines}
    assert ("unix:nobody", "unix") in principals and ("unix:root", "unix") in principals


def test_policy_file_applies_to_unix_users(tmp_path, shared_dir, tailscale: FakeTailscale) -> None:  # type: ignore[no-untyped-def]
    policy = tmp_path / "acl.json"
    policy.write_text(
        json.dumps([{"principal": "unix:nobody", "action": ["get"], "secret": ["shared/*"]}])
    )
    config = make_config(tmp_path / "state", shared_dir, tailscale, acl_path=policy)
    with LegerdThread(config) as running:
        with running.unix() as root:
            root.post("/api/put", json={"Name": "shared/a", "Value": b64(b"a")})
        assert call_as("nobody", config.socket_path, "get", {"Name": "shared/a"})[0] == 200
        assert call_as("nobody", config.socket_path, "info", {"Name": "shared/a"})[0] == 403


def test_dev_mode_trusts_loopback_callers(dev_legerd: LegerdThread) -> None:
    with dev_legerd.tcp("127.0.0.1") as client:
        assert client.post("/api/put", json={"Name": "any/thing", "Value": b64(b"v")}).json() == 1
    status, _ = call_as("nobody", dev_legerd.config.socket_path, "get", {"Name": "any/thing"})
    assert status == 200


def test_dev_mode_refuses_a_non_loopback_listener(tmp_path: Path, shared_dir: Path) -> None:
    config = make_config(tmp_path / "s", shared_dir, None, dev=True, listen="0.0.0.0:8573")
    with pytest.raises(ConfigProblem, match="loopback"):
        Legerd(config)


def test_without_dev_loopback_callers_need_an_identity(legerd: LegerdThread) -> None:
    # 127.0.0.1 is unknown to the (fake) tailscaled: no implicit trust outside --dev.
    with legerd.tcp("127.0.0.1") as client:
        response = client.post("/api/list", content=b"{}")
    assert (response.status_code, response.text) == (500, "unable to identify caller\n")


def test_a_forwarded_address_does_not_name_the_caller(
    legerd: LegerdThread, tailscale: FakeTailscale
) -> None:
    """Anyone on the host reaches loopback: a forwarded-for header from there must not make
    tailscaled be asked about, and the caller be taken for, another tailnet node."""
    tailscale.identities["100.64.0.22"] = whois_tagged(
        ["tag:prod"], [{"action": ["get", "list"], "secret": ["*"]}]
    )
    with legerd.tcp("127.0.0.1") as client:
        response = client.post(
            "/api/list", content=b"{}", headers={"X-Forwarded-For": "100.64.0.22"}
        )
    assert (response.status_code, response.text) == (500, "unable to identify caller\n")
    assert not any(call.startswith("100.64.0.22") for call in tailscale.calls)


def _first_address_beyond_loopback() -> str:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    raise AssertionError("this host has no IPv4 address beyond loopback")


def test_a_caller_on_legerds_own_host_is_not_taken_for_the_host_node(
    tmp_path: Path, shared_dir: Path, tailscale: FakeTailscale
) -> None:
    """tailscaled names the host's own node for the host's own (tailnet) address: over TCP,
    any local user would get the host's grants. Local callers use the unix socket."""
    own = _first_address_beyond_loopback()  # stands for the host's tailnet address
    grant = [{"action": ["get", "info"], "secret": ["*"]}]
    tailscale.identities[own] = whois_tagged(["tag:host"], grant)
    tailscale.identities["127.0.0.1"] = whois_tagged(["tag:host"], grant)
    config = make_config(tmp_path / "state", shared_dir, tailscale)
    with LegerdThread(config) as running:
        with running.unix() as root:
            root.post("/api/put", json={"Name": "db/password", "Value": b64(b"hunter2")})
        # From the address the listener is on, and from another of the host's addresses.
        for source in ("127.0.0.1", own):
            with running.tcp(source) as local:
                response = local.post("/api/get", json={"Name": "db/password"})
            assert (response.status_code, response.text) == (500, "unable to identify caller\n")
    assert not any(call.startswith((own, "127.0.0.1:")) for call in tailscale.calls)


# tailscaled's whois cache: a tailnet address belongs to one node, whatever the port.


def _ask(whois: WhoIs, addresses: list[str]) -> list[str]:
    async def run() -> list[str]:
        try:
            return [(await whois.whois(a))["Node"]["Name"] for a in addresses]
        finally:
            await whois.aclose()

    return asyncio.run(run())


def test_whois_asks_tailscaled_once_per_node_not_once_per_connection(
    tailscale: FakeTailscale,
) -> None:
    """Before: the cache was keyed by IP:port, so each new connection (a new source port) of
    the same node cost a call to tailscaled: 40 connections, 40 calls. Now 2 (one per node)."""
    tailscale.identities["100.64.0.22"] = whois_tagged(["tag:web"])
    tailscale.identities["fd7a:115c:a1e0::22"] = whois_user("alice@example.com")
    addresses = [f"100.64.0.22:{40000 + n}" for n in range(20)]
    addresses += [f"[fd7a:115c:a1e0::22]:{40000 + n}" for n in range(20)]
    names = _ask(WhoIs(tailscale.path), addresses)
    assert names == ["web-1.example.ts.net."] * 20 + ["alice-laptop.example.ts.net."] * 20
    assert tailscale.calls == ["100.64.0.22:40000", "[fd7a:115c:a1e0::22]:40000"]


def test_whois_asks_per_port_for_addresses_outside_the_tailnet(tailscale: FakeTailscale) -> None:
    """tailscaled names the peer of a loopback connection it proxied (userspace networking,
    `tailscale serve`) by that connection's port: one loopback address stands for many
    nodes, so the answer for one port is never reused for another."""
    tailscale.identities["127.0.0.2"] = whois_tagged(["tag:web"])
    _ask(WhoIs(tailscale.path), ["127.0.0.2:40000", "127.0.0.2:40001", "127.0.0.2:40000"])
    assert tailscale.calls == ["127.0.0.2:40000", "127.0.0.2:40001"]


def test_a_reused_tailnet_address_is_seen_as_its_new_node_within_the_ttl(
    tailscale: FakeTailscale,
) -> None:
    """A node deleted and its address given to another: the cached answer is dropped TTL
    seconds after it was asked, however often it is used meanwhile (no sliding expiry)."""
    tailscale.identities["100.64.0.22"] = whois_tagged(["tag:web"])
    whois = WhoIs(tailscale.path, ttl=0.5)

    async def run() -> list[str]:
        names = []
        try:
            deadline = time.monotonic() + 1.0
            # Twice at least: a stalled machine may spend the whole second on the first ask.
            while time.monotonic() < deadline or len(names) < 2:
                names.append((await whois.whois("100.64.0.22:1"))["Node"]["Name"])
                tailscale.identities["100.64.0.22"] = whois_user("bob@example.com")
                await asyncio.sleep(0.05)
        finally:
            await whois.aclose()
        return names

    names = asyncio.run(run())
    assert names[0] == "web-1.example.ts.net." and names[-1] == "bob-laptop.example.ts.net."
