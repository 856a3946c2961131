"""The first whois lookups of a new tailnet node, made at once by many connections, are one
call to tailscaled; a failed lookup is not kept. legerd's Identifier against a fake
tailscaled on a real unix socket, which holds its answers until the test lets them go, so
that every connection's lookup is in flight at the same time.

legerd itself cannot be reached from a tailnet address here (the test host has none), and
connections from loopback addresses are, by design, looked up per connection (see
``cache_key``): so the Identifier is driven directly, with the scopes uvicorn gives it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from legator.core.auth.tailscale import WhoIs
from legator.secrets.acl import Policy
from legator.secrets.api import Identifier
from legator.secrets.identity import Caller, IdentityError
from tests.secrets.conftest import wait_for, whois_tagged

NODE = "100.64.0.22"
CONNECTIONS = 20


class GatedTailscale:
    """tailscaled's LocalAPI whois, answering only once ``gate`` is set."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.identities: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.gate = threading.Event()

        async def whois(request: Request) -> Response:
            addr = request.query_params.get("addr", "")
            self.calls.append(addr)
            await asyncio.to_thread(self.gate.wait, 60)
            ip = addr.rsplit(":", 1)[0].strip("[]")
            if ip not in self.identities:
                return PlainTextResponse(f"no match for IP:port {addr}\n", status_code=404)
            return JSONResponse(self.identities[ip])

        app = Starlette(routes=[Route("/localapi/v0/whois", whois)])
        self.server = uvicorn.Server(uvicorn.Config(app, uds=str(path), log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)


@pytest.fixture
def tailscaled(shared_dir: Path) -> Iterator[GatedTailscale]:
    fake = GatedTailscale(shared_dir / "tailscaled.sock")
    fake.thread.start()
    wait_for(lambda: fake.server.started)
    yield fake
    fake.gate.set()
    fake.server.should_exit = True
    fake.thread.join(timeout=10)


def request_from(host: str, port: int) -> Request:
    """What uvicorn hands legerd for a TCP connection from ``host:port``."""
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/api/get",
            "headers": [],
            "client": (host, port),
            "server": ("127.0.0.1", 8573),
            "state": {},
        }
    )


async def until(check: Any) -> None:
    """Let the loop run until ``check()`` (tailscaled's calls arrive on its own thread)."""
    async with asyncio.timeout(30):
        while not check():
            await asyncio.sleep(0.01)


def identify_at_once(
    identifier: Identifier, tailscaled: GatedTailscale, host: str, expected_calls: int
) -> list[Caller | BaseException]:
    """CONNECTIONS lookups from ``host`` (one port each), all started before tailscaled
    answers any (each has checked the cache by then): the gate opens once
    ``expected_calls`` calls reached it."""

    async def run() -> list[Caller | BaseException]:
        lookups = [
            asyncio.ensure_future(identifier.identify(request_from(host, 40000 + n)))
            for n in range(CONNECTIONS)
        ]
        await until(lambda: len(tailscaled.calls) >= expected_calls)
        tailscaled.gate.set()
        return await asyncio.gather(*lookups, return_exceptions=True)

    return asyncio.run(run())


def new_identifier(tailscaled: GatedTailscale) -> Identifier:
    return Identifier(Policy(), WhoIs(tailscaled.path), dev=False)


def test_simultaneous_first_lookups_of_a_node_make_one_whois_call(
    tailscaled: GatedTailscale,
) -> None:
    """Before: 20 connections from a new node made 20 whois calls."""
    tailscaled.identities[NODE] = whois_tagged(["tag:web"])
    callers = identify_at_once(new_identifier(tailscaled), tailscaled, NODE, 1)
    assert [c.principal for c in callers if isinstance(c, Caller)] == ["tag:web"] * CONNECTIONS
    assert tailscaled.calls == [f"{NODE}:40000"]


def test_a_failed_lookup_is_shared_while_in_flight_but_not_kept(
    tailscaled: GatedTailscale,
) -> None:
    identifier = new_identifier(tailscaled)
    failed = identify_at_once(identifier, tailscaled, NODE, 1)  # tailscaled knows no such node
    assert all(isinstance(f, IdentityError) for f in failed), failed
    assert len(tailscaled.calls) == 1
    tailscaled.identities[NODE] = whois_tagged(["tag:web"])  # the node is now known

    async def again() -> Caller:
        return await identifier.identify(request_from(NODE, 41000))

    assert asyncio.run(again()).principal == "tag:web"
    assert len(tailscaled.calls) == 2


def test_a_waiter_that_hangs_up_does_not_cancel_the_others_lookup(
    tailscaled: GatedTailscale,
) -> None:
    tailscaled.identities[NODE] = whois_tagged(["tag:web"])
    identifier = new_identifier(tailscaled)

    async def run() -> str:
        first = asyncio.ensure_future(identifier.identify(request_from(NODE, 40000)))
        second = asyncio.ensure_future(identifier.identify(request_from(NODE, 40001)))
        await until(lambda: len(tailscaled.calls) == 1)
        first.cancel()  # that caller's connection went away
        await asyncio.sleep(0)
        tailscaled.gate.set()
        return (await second).principal

    assert asyncio.run(run()) == "tag:web"
    assert len(tailscaled.calls) == 1


def test_lookups_of_different_nodes_are_not_merged(tailscaled: GatedTailscale) -> None:
    tailscaled.identities[NODE] = whois_tagged(["tag:web"])
    tailscaled.identities["100.64.0.23"] = whois_tagged(["tag:db"])
    identifier = new_identifier(tailscaled)

    async def run() -> list[str]:
        lookups = [identifier.identify(request_from(host, 40000)) for host in (NODE, "100.64.0.23")]
        tasks = [asyncio.ensure_future(lookup) for lookup in lookups]
        await until(lambda: len(tailscaled.calls) == 2)
        tailscaled.gate.set()
        return [caller.principal for caller in await asyncio.gather(*tasks)]

    assert asyncio.run(run()) == ["tag:web", "tag:db"]
