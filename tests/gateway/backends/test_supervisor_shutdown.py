"""A clean control-plane stop stops every managed backend at once: backends slow to stop
(they ignore SIGTERM) hold it up for one grace period, not one each, and every one is gone
(killed and reaped) and recorded as stopped when it returns."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from legator.gateway.models import GatewayRuntime
from legator.gateway.runtimes.base import STOP_GRACE_S
from tests.gateway.backends.conftest import backend, register_managed
from tests.support import live_server

pytestmark = pytest.mark.slow

# A stand-in for llama-server that answers its health check and ignores SIGTERM, as a server
# busy freeing a large model can: only the SIGKILL after the grace period ends it.
STUBBORN_SERVER = """#!{python}
import http.server, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
port = int(sys.argv[sys.argv.index("--port") + 1])


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{{}}")

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""
MODELS = ("slow-1", "slow-2", "slow-3")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_shutdown_stops_backends_slow_to_stop_all_at_once(tmp_path: Path, gguf_file: Path) -> None:
    server = tmp_path / "llama-server"
    server.write_text(STUBBORN_SERVER.format(python=sys.executable))
    server.chmod(0o755)
    settings = {"gateway_llama_server": str(server), "gateway_start_timeout_s": 30}
    with live_server(tmp_path / "data", **settings) as gw, gw.client(gw.admin_key) as admin:
        pids = []
        for model_id in MODELS:
            register_managed(admin, model_id, gguf_file)
            started = admin.post(f"/api/v1/gateway/backends/{model_id}/start?wait=true").json()
            assert started["state"] == "ready", started
            pids.append(started["pid"])
        supervisor = gw.app.state.gateway.supervisor  # type: ignore[union-attr]

        began = time.monotonic()
        stopping = asyncio.run_coroutine_threadsafe(supervisor.shutdown(), gw.loop)
        stopping.result(timeout=120)
        took = time.monotonic() - began
        print(f"shutdown of {len(pids)} backends that ignore SIGTERM: {took:.2f} s")

        # Gone, not merely signalled, by the time shutdown returns.
        assert all(gone(pid) for pid in pids), [p for p in pids if not gone(p)]
        # At once, not one after another (three graces); the room is for a stalled machine.
        assert took < 2 * STOP_GRACE_S, f"{len(pids)} backends took {took:.1f} s to stop"
        assert took >= STOP_GRACE_S - 0.5, f"the grace period was cut short: {took:.1f} s"

        async def rows() -> dict[str, str]:
            async with gw.core.db.session() as session:  # type: ignore[union-attr]
                found = (await session.scalars(select(GatewayRuntime))).all()
                return {row.model_id: row.state for row in found}

        assert gw.call(rows()) == dict.fromkeys(MODELS, "stopped")
        for model_id in MODELS:
            assert backend(admin, model_id)["state"] == "stopped"
            model = admin.get(f"/api/v1/gateway/models/{model_id}").json()
            assert model["state"] == "unavailable"
            assert model_id not in gw.app.state.gateway.scheduler.pools  # type: ignore[union-attr]
