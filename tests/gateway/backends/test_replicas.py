"""A managed backend (a real llama.cpp server) under two replicas: it belongs to the replica
that started it. The other one shows it, refuses to start or stop it and says where it runs,
never fails or adopts it (also when it restarts), and a delete through it stops it. Given the
owner's LEGATOR_REPLICA_URL, the other one forwards the model's /v1 requests to it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import psutil
import pytest

from legator.core.db import utcnow
from legator.gateway.models import GatewayRuntime
from legator.gateway.supervisor import LEASE_S
from tests.gateway.backends.conftest import backend, register_managed
from tests.gateway.test_replicas import chat, gateway, soon
from tests.support import LiveServer, cluster_settings, free_port, live_server, replica_pair

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_a_backend_belongs_to_the_replica_that_started_it(
    pg_url: str, tmp_path: Path, gguf_file: Path
) -> None:
    shared = cluster_settings(pg_url, gateway_start_timeout_s=90)
    a = LiveServer(tmp_path / "a", replica_id="replica-a", **shared).start()
    b = LiveServer(tmp_path / "b", replica_id="replica-b", **shared).start()
    try:
        with a.client(a.admin_key, timeout=120) as via_a, b.client(a.admin_key) as via_b:
            register_managed(via_a, "tiny", gguf_file)
            started = via_a.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
            assert started.status_code == 200, started.text
            assert started.json()["state"] == "ready" and started.json()["replica"] == "replica-a"
            pid = started.json()["pid"]
            assert chat(via_a, "tiny").status_code == 200

            soon(lambda: backend(via_b, "tiny")["state"] == "ready")
            assert backend(via_b, "tiny")["replica"] == "replica-a"
            refused = chat(via_b, "tiny")
            assert refused.status_code == 503 and "replica 'replica-a'" in refused.text
            again = via_b.post("/api/v1/gateway/backends/tiny/start")
            assert again.status_code == 409 and "replica 'replica-a'" in again.text
            stop = via_b.post("/api/v1/gateway/backends/tiny/stop")
            assert stop.status_code == 409 and "through that replica" in stop.text

            # B restarts: it neither adopts nor fails what A runs.
            b.stop()
            b = LiveServer(tmp_path / "b", replica_id="replica-b", **shared).start()
            with b.client(a.admin_key) as via_b_again:
                assert backend(via_b_again, "tiny")["state"] == "ready"
            assert via_a.get("/api/v1/gateway/models/tiny").json()["state"] == "ready"
            assert chat(via_a, "tiny").status_code == 200
            assert psutil.pid_exists(pid)

            # Deleted through B: A stops its process.
            with b.client(a.admin_key) as via_b_again:
                assert via_b_again.delete("/api/v1/gateway/models/tiny").status_code == 204
            soon(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
            soon(lambda: via_a.get("/api/v1/gateway/models/tiny").status_code == 404)
    finally:
        b.stop()
        a.stop()


def _usage_requests(admin: httpx.Client) -> int:
    return int(admin.get("/api/v1/gateway/usage/all", params={"period": "hour"}).json()["requests"])


def test_the_other_replica_forwards_requests_to_the_one_that_runs_the_backend(
    pg_url: str, tmp_path: Path, gguf_file: Path
) -> None:
    shared = cluster_settings(pg_url, gateway_start_timeout_s=90)
    with (
        replica_pair(tmp_path, shared, own_urls=True) as (a, b),
        a.client(a.admin_key, timeout=120) as via_a,
        b.client(a.admin_key) as via_b,
    ):
        register_managed(via_a, "tiny", gguf_file)
        started = via_a.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
        assert started.status_code == 200, started.text
        soon(lambda: backend(via_b, "tiny")["state"] == "ready")
        # B's catalogue hears of the model's new state too (a moment after the row).
        soon(lambda: gateway(b).catalog.models["tiny"].state == "ready")

        answer = chat(via_b, "tiny")
        assert answer.status_code == 200, answer.text
        assert answer.json()["object"] == "chat.completion"
        assert answer.headers["content-type"].startswith("application/json")
        body = {"model": "tiny", "stream": True, "max_tokens": 8}
        body["messages"] = [{"role": "user", "content": "hello"}]
        with via_b.stream("POST", "/v1/chat/completions", json=body) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 2
        messages = {"model": "tiny", "max_tokens": 8}
        messages["messages"] = [{"role": "user", "content": "hello"}]
        anthropic = via_b.post("/v1/messages", json=messages)
        assert anthropic.status_code == 200 and anthropic.json()["type"] == "message"
        # The owner admitted and billed each of them once; B only passed them on.
        soon(lambda: _usage_requests(via_a) == 3)
        metrics = via_b.get("/metrics").text
        assert 'legator_gateway_forwarded_requests_total{replica="replica-a"} 3.0' in metrics
        # The owner's answer is relayed as it is, errors included.
        refused = via_b.post("/v1/chat/completions", json={"model": "tiny"})
        assert refused.status_code == 400 and "messages" in refused.text
        # A request another replica already forwarded is never forwarded again; a client
        # cannot pass its request off as one.
        assert b.app is not None
        token = b.app.state.gateway.forwarding_token
        looped = via_b.post(
            "/v1/chat/completions",
            json=body | {"stream": False},
            headers={"x-legator-forwarded": token},
        )
        assert looped.status_code == 503 and "replica 'replica-a'" in looped.text
        forged = via_b.post(
            "/v1/chat/completions",
            json=body | {"stream": False},
            headers={"x-legator-forwarded": "0" * 64},
        )
        assert forged.status_code == 200, forged.text
        assert token not in forged.text and token not in str(forged.headers)

        # The owner unreachable (its lease not yet run out): a clear 503, in the caller's
        # format.
        async def moved_away() -> None:
            assert a.core is not None
            async with a.core.db.write() as session:
                row = await session.get(GatewayRuntime, "tiny")
                assert row is not None
                row.replica_url = f"http://127.0.0.1:{free_port()}"

        a.call(moved_away())
        assert b.app is not None
        b.call(b.app.state.gateway.supervisor.refresh_elsewhere())
        gone = chat(via_b, "tiny")
        message = gone.json()["error"]["message"]
        assert gone.status_code == 503 and "replica 'replica-a', which did not answer" in message
        assert "127.0.0.1" not in message  # no internal address for clients
        assert gone.headers["retry-after"] == "5"
        gone = via_b.post("/v1/messages", json=messages)
        assert gone.status_code == 503 and gone.json()["type"] == "error"


def test_a_silent_owner_lets_another_replica_take_over(
    pg_url: str, tmp_path: Path, gguf_file: Path
) -> None:
    shared = cluster_settings(pg_url, gateway_start_timeout_s=90)
    with (
        live_server(tmp_path / "a", replica_id="replica-a", **shared) as a,
        a.client(a.admin_key, timeout=120) as admin,
    ):
        register_managed(admin, "tiny", gguf_file)

        async def left_by_a_replica_now_gone(seconds_ago: float) -> None:
            assert a.core is not None
            async with a.core.db.write() as session:
                await session.merge(
                    GatewayRuntime(
                        model_id="tiny",
                        kind="process",
                        state="ready",
                        pid=2**22 + 1,
                        owner="gone-host:/var/lib/legator/gateway/backends",
                        replica="replica-gone",
                        updated_at=utcnow() - timedelta(seconds=seconds_ago),
                    )
                )

        a.call(left_by_a_replica_now_gone(LEASE_S - 10))
        refused = admin.post("/api/v1/gateway/backends/tiny/start")
        assert refused.status_code == 409, refused.text
        assert "ready on replica 'replica-gone'" in refused.json()["error"]["message"]
        a.call(left_by_a_replica_now_gone(LEASE_S + 1))
        started = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"})
        assert started.status_code == 200, started.text
        assert started.json()["state"] == "ready" and started.json()["replica"] == "replica-a"
