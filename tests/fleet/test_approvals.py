# ruff: noqa: S604  (shell=True marks a command line to classify; nothing is executed here)
"""The approval queue and the gate, through the real app and database: modes, two-person
rules, exactly-once dispatch under races and restarts, expiry, cancel, audit."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from legator.core.auth.principal import Principal
from legator.core.db import Database, utcnow
from legator.core.errors import Forbidden
from legator.core.runtime import Core
from legator.fleet.approvals.models import Approval
from legator.fleet.approvals.schemas import ApprovalMode, ApprovalOut
from legator.fleet.gate import Action, GateResult, Target
from legator.fleet.policy import Policy
from tests.support import LiveServer, run_cli

FULL = Policy(level="remediate")
OBSERVE_ONLY = Policy(level="observe")


class Recorder:
    """A dispatcher that appends to a file, so runs are counted across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def __call__(self, approval: ApprovalOut, _payload: dict[str, Any]) -> dict[str, Any]:
        with self.path.open("a") as handle:
            handle.write(
                json.dumps({"id": approval.id, "payload_targets": approval.targets}) + "\n"
            )
        return {"ran": approval.summary}

    def runs(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    return Recorder(tmp_path / "runs.ndjson")


@pytest.fixture
def gate_server(tmp_path: Path, recorder: Recorder) -> Iterator[LiveServer]:
    def register(app: FastAPI, _core: Core) -> None:
        app.state.approvals.register_dispatcher("test.command", recorder)

    server = LiveServer(tmp_path / "data", customize=register).start()
    try:
        yield server
    finally:
        server.stop()


def principal_of(server: LiveServer, key: str) -> Principal:
    assert server.core is not None
    found = server.call(server.core.auth.authenticate_key(key))
    assert found is not None
    return found


def check(
    server: LiveServer,
    key: str,
    command: str,
    *,
    mode: ApprovalMode = ApprovalMode.MUTATION_GATE,
    policy: Policy = FULL,
    targets: tuple[str, ...] = ("prb-00000001",),
) -> GateResult:
    assert server.app is not None
    action = Action(kind="test.command", origin="rest", command=command, shell=True)
    gate_targets = [Target(t, "custom", policy, mode) for t in targets]
    return server.call(server.app.state.gate.check(action, gate_targets, principal_of(server, key)))


def user_key(api: httpx.Client, name: str, role: str = "operator") -> str:
    created = api.post(
        "/api/v1/users", json={"username": name, "password": "long enough password", "role": role}
    )
    assert created.status_code == 201, created.text
    return api.post("/api/v1/keys", json={"user": name}).json()["key"]


def test_modes_decide_allow_queue_or_deny(gate_server: LiveServer) -> None:
    key = gate_server.admin_key
    assert check(gate_server, key, "ls -la").decision == "allow"
    assert check(gate_server, key, "journalctl -u x").decision == "allow"
    queued = check(gate_server, key, "rm -rf /tmp/x")
    assert queued.decision == "queue" and queued.approval is not None
    assert queued.rationale["risk"] == "critical" and "risk critical" in queued.rationale["drivers"]
    assert queued.headers == {
        "X-Legator-Policy-Decision": "queue",
        "X-Legator-Risk-Tier": "critical",
    }
    assert check(gate_server, key, "ls", mode=ApprovalMode.EVERY_ACTION).decision == "queue"
    assert check(gate_server, key, "rm -rf /tmp/x", mode=ApprovalMode.NONE).decision == "allow"
    denied = check(gate_server, key, "rm -rf /tmp/x", policy=OBSERVE_ONLY)
    assert denied.decision == "deny" and denied.approval is None
    assert "policy custom" in denied.rationale["denied"]["prb-00000001"]


def test_fan_out_queues_one_approval_listing_every_target(gate_server: LiveServer) -> None:
    targets = ("prb-0000000a", "prb-0000000b", "prb-0000000c")
    result = check(gate_server, gate_server.admin_key, "systemctl restart nginx", targets=targets)
    assert result.decision == "queue" and result.approval is not None
    assert result.approval.targets == list(targets)
    with gate_server.client(gate_server.admin_key) as api:
        assert len(api.get("/api/v1/approvals", params={"status": "pending"}).json()) == 1


def test_approve_dispatches_once_and_audits(gate_server: LiveServer, recorder: Recorder) -> None:
    with gate_server.client(gate_server.admin_key) as api:
        approver = user_key(api, "approver")
        approval = check(gate_server, gate_server.admin_key, "systemctl restart nginx").approval
        assert approval is not None
        with gate_server.client(approver) as other:
            decided = other.post(
                f"/api/v1/approvals/{approval.id}/decide",
                json={"decision": "approve", "reason": "ok"},
            )
            assert decided.status_code == 200, decided.text
            body = decided.json()
            assert body["status"] == "dispatched" and body["result"] == {
                "ran": "systemctl restart nginx"
            }
            assert body["decisions"][0]["approver"] == "approver"
            again = other.post(
                f"/api/v1/approvals/{approval.id}/decide", json={"decision": "approve"}
            )
            assert again.status_code == 409
        assert len(recorder.runs()) == 1
        actions = [e["action"] for e in api.get("/api/v1/audit").json()["events"]]
        for expected in (
            "gate.decision",
            "approval.request",
            "approval.decide",
            "approval.dispatch",
            "approval.result",
        ):
            assert expected in actions


def test_a_waiter_sees_the_dispatch_outcome_not_only_the_claim(tmp_path: Path) -> None:
    # The status turns to dispatched when the run is claimed, before the dispatcher has run
    # and its result is stored; a waiter returning then saw no result (a chat took the
    # approved command for one that was never sent).
    async def slow(approval: ApprovalOut, _payload: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(1.5)  # longer than the waiter's 1 s between looks
        return {"ran": approval.summary}

    def register(app: FastAPI, _core: Core) -> None:
        app.state.approvals.register_dispatcher("test.command", slow)

    server = LiveServer(tmp_path / "data", customize=register).start()
    try:
        approval = check(server, server.admin_key, "rm -rf /tmp/x").approval
        assert approval is not None
        assert server.app is not None
        approvals = server.app.state.approvals
        waited: list[ApprovalOut] = []
        waiter = threading.Thread(
            target=lambda: waited.append(server.call(approvals.wait(approval.id, 10)))
        )
        waiter.start()
        with server.client(server.admin_key) as api:
            decided = api.post(
                f"/api/v1/approvals/{approval.id}/decide", json={"decision": "approve"}
            )
        assert decided.status_code == 200, decided.text
        waiter.join(15)
        assert waited and waited[0].status == "dispatched"
        assert waited[0].result == {"ran": "rm -rf /tmp/x"}
    finally:
        server.stop()


def test_approver_comes_from_authentication_not_the_body(gate_server: LiveServer) -> None:
    approval = check(gate_server, gate_server.admin_key, "rm -rf /tmp/x").approval
    assert approval is not None
    with gate_server.client(gate_server.admin_key) as api:
        forged = api.post(
            f"/api/v1/approvals/{approval.id}/decide",
            json={"decision": "approve", "approver": "someone-else"},
        )
        assert forged.status_code == 422


def test_deny_ends_it(gate_server: LiveServer, recorder: Recorder) -> None:
    approval = check(gate_server, gate_server.admin_key, "rm -rf /tmp/x").approval
    assert approval is not None
    with gate_server.client(gate_server.admin_key) as api:
        denied = api.post(
            f"/api/v1/approvals/{approval.id}/decide", json={"decision": "deny", "reason": "no"}
        )
        assert denied.json()["status"] == "denied"
        late = api.post(f"/api/v1/approvals/{approval.id}/decide", json={"decision": "approve"})
        assert late.status_code == 409
    assert recorder.runs() == []


def test_two_person_rules(gate_server: LiveServer, recorder: Recorder) -> None:
    with gate_server.client(gate_server.admin_key) as api:
        requester = user_key(api, "req")
        first, second = user_key(api, "first"), user_key(api, "second")
    approval = check(gate_server, requester, "rm -rf /tmp/x", mode=ApprovalMode.TWO_PERSON).approval
    assert approval is not None and approval.required_approvals == 2
    url = f"/api/v1/approvals/{approval.id}/decide"
    with (
        gate_server.client(requester) as req,
        gate_server.client(first) as one,
        gate_server.client(second) as two,
    ):
        assert req.post(url, json={"decision": "approve"}).status_code == 403
        assert one.post(url, json={"decision": "approve"}).json()["status"] == "pending"
        assert one.post(url, json={"decision": "approve"}).status_code == 409  # same person twice
        assert recorder.runs() == []
        final = two.post(url, json={"decision": "approve"}).json()
        assert final["status"] == "dispatched"
    assert len(recorder.runs()) == 1
    low = check(gate_server, requester, "systemctl status x", mode=ApprovalMode.TWO_PERSON)
    assert low.decision == "allow"


def test_two_person_any_deny_ends_it(gate_server: LiveServer, recorder: Recorder) -> None:
    with gate_server.client(gate_server.admin_key) as api:
        first, second = user_key(api, "a1"), user_key(api, "a2")
    approval = check(
        gate_server, gate_server.admin_key, "reboot", mode=ApprovalMode.TWO_PERSON
    ).approval
    assert approval is not None
    url = f"/api/v1/approvals/{approval.id}/decide"
    with gate_server.client(first) as one, gate_server.client(second) as two:
        one.post(url, json={"decision": "approve"})
        assert two.post(url, json={"decision": "deny"}).json()["status"] == "denied"
    assert recorder.runs() == []


def test_concurrent_decisions_dispatch_exactly_once(
    gate_server: LiveServer, recorder: Recorder
) -> None:
    with gate_server.client(gate_server.admin_key) as api:
        keys = [user_key(api, f"racer{i}") for i in range(6)]
    approval = check(gate_server, gate_server.admin_key, "rm -rf /tmp/x").approval
    assert approval is not None
    statuses: list[int] = []
    barrier = threading.Barrier(len(keys))

    def approve(key: str) -> None:
        with gate_server.client(key) as client:
            barrier.wait()
            response = client.post(
                f"/api/v1/approvals/{approval.id}/decide", json={"decision": "approve"}
            )
            statuses.append(response.status_code)

    threads = [threading.Thread(target=approve, args=(k,)) for k in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] + [409] * 5
    assert len(recorder.runs()) == 1


def test_pending_approvals_survive_restart_and_run_once(
    gate_server: LiveServer, recorder: Recorder
) -> None:
    ids = []
    for line in ("rm -rf /tmp/a", "rm -rf /tmp/b", "rm -rf /tmp/c"):
        approval = check(gate_server, gate_server.admin_key, line).approval
        assert approval is not None
        ids.append(approval.id)
    gate_server.restart()
    with gate_server.client(gate_server.admin_key) as api:
        pending = api.get("/api/v1/approvals", params={"status": "pending"}).json()
        assert sorted(a["id"] for a in pending) == sorted(ids)
        decided = api.post(f"/api/v1/approvals/{ids[0]}/decide", json={"decision": "approve"})
        assert decided.json()["status"] == "dispatched"
    assert [run["id"] for run in recorder.runs()] == [ids[0]]


def test_approved_but_not_dispatched_before_a_stop_runs_once_after_restart(
    gate_server: LiveServer, recorder: Recorder
) -> None:
    approval = check(gate_server, gate_server.admin_key, "rm -rf /tmp/x").approval
    assert approval is not None and gate_server.core is not None
    url = gate_server.core.settings.effective_database_url
    gate_server.stop()
    asyncio.run(_set(url, approval.id, status="approved"))  # as if we stopped right after approval
    gate_server.start()
    gate_server.restart()  # a second start must not run it again
    assert [run["id"] for run in recorder.runs()] == [approval.id]
    with gate_server.client(gate_server.admin_key) as api:
        assert api.get(f"/api/v1/approvals/{approval.id}").json()["status"] == "dispatched"


def test_expiry(gate_server: LiveServer, recorder: Recorder) -> None:
    approval = check(gate_server, gate_server.admin_key, "rm -rf /tmp/x").approval
    assert approval is not None and gate_server.core is not None and gate_server.app is not None
    assert approval.expires_at - approval.created_at == timedelta(minutes=15)
    asyncio.run(
        _set(gate_server.core.settings.effective_database_url, approval.id, expires_at=utcnow())
    )
    assert gate_server.call(gate_server.app.state.approvals.expire_due()) == 1
    with gate_server.client(gate_server.admin_key) as api:
        assert api.get(f"/api/v1/approvals/{approval.id}").json()["status"] == "expired"
        late = api.post(f"/api/v1/approvals/{approval.id}/decide", json={"decision": "approve"})
        assert late.status_code == 409
    assert recorder.runs() == []


def test_cancel_by_requester_only(gate_server: LiveServer) -> None:
    with gate_server.client(gate_server.admin_key) as api:
        requester, other = user_key(api, "asker"), user_key(api, "bystander")
    approval = check(gate_server, requester, "rm -rf /tmp/x").approval
    assert approval is not None
    url = f"/api/v1/approvals/{approval.id}/cancel"
    with gate_server.client(other) as bystander, gate_server.client(requester) as asker:
        assert bystander.post(url).status_code == 403
        assert asker.post(url, json={"reason": "typo"}).json()["status"] == "cancelled"
        assert asker.post(url).status_code == 409


def scoped_key(api: httpx.Client, scopes: list[str], user: str | None = None) -> str:
    body: dict[str, Any] = {"name": "-".join(scopes), "scopes": scopes}
    if user:
        body["user"] = user
    created = api.post("/api/v1/keys", json=body)
    assert created.status_code == 201, created.text
    return created.json()["key"]  # type: ignore[no-any-return]


def test_cancel_of_someone_elses_approval_needs_fleet_admin_not_the_admin_role(
    gate_server: LiveServer,
) -> None:
    with gate_server.client(gate_server.admin_key) as api:
        requester = user_key(api, "asker")
        narrow = {
            "inference": scoped_key(api, ["inference"]),
            "read+decide": scoped_key(api, ["fleet:read", "approvals:decide"]),
            "command": scoped_key(api, ["fleet:command"]),
        }
        command_and_admin = scoped_key(api, ["fleet:command", "fleet:admin"])
    first = check(gate_server, requester, "rm -rf /tmp/x").approval
    second = check(gate_server, requester, "rm -rf /tmp/y").approval
    assert first is not None and second is not None
    for name, key in narrow.items():
        with gate_server.client(key) as admin:
            refused = admin.post(f"/api/v1/approvals/{first.id}/cancel", json={"reason": "x"})
            assert refused.status_code == 403, (name, refused.text)
    with gate_server.client(gate_server.admin_key) as api:
        assert api.get(f"/api/v1/approvals/{first.id}").json()["status"] == "pending"
        cancelled = api.post(f"/api/v1/approvals/{first.id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    with gate_server.client(command_and_admin) as admin:
        cancelled = admin.post(f"/api/v1/approvals/{second.id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_requester_cancels_only_with_a_key_that_may_request(gate_server: LiveServer) -> None:
    with gate_server.client(gate_server.admin_key) as api:
        requester = user_key(api, "asker")
        inference = scoped_key(api, ["inference"], user="asker")
        read_only = scoped_key(api, ["fleet:read"], user="asker")
    approval = check(gate_server, requester, "rm -rf /tmp/x").approval
    assert approval is not None and gate_server.app is not None
    url = f"/api/v1/approvals/{approval.id}/cancel"
    for key in (inference, read_only):
        with gate_server.client(key) as narrow:
            assert narrow.post(url, json={"reason": "x"}).status_code == 403
    service = gate_server.app.state.approvals
    for key in (inference, read_only):  # the service refuses them too, whoever calls it
        with pytest.raises(Forbidden):
            gate_server.call(service.cancel(approval.id, principal_of(gate_server, key)))
    with gate_server.client(requester) as asker:
        assert asker.get(url.removesuffix("/cancel")).json()["status"] == "pending"
        cancelled = asker.post(url, json={"reason": "typo"})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_viewers_cannot_decide(gate_server: LiveServer) -> None:
    approval = check(gate_server, gate_server.admin_key, "rm -rf /tmp/x").approval
    assert approval is not None
    with gate_server.client(gate_server.admin_key) as api:
        viewer = user_key(api, "watcher", role="viewer")
    with gate_server.client(viewer) as client:
        assert client.get("/api/v1/approvals").status_code == 200
        response = client.post(
            f"/api/v1/approvals/{approval.id}/decide", json={"decision": "approve"}
        )
        assert response.status_code == 403


async def _set(url: str, approval_id: str, **values: Any) -> None:
    db = Database(url)
    try:
        async with db.write() as session:
            await session.execute(
                update(Approval).where(Approval.id == approval_id).values(**values)
            )
    finally:
        await db.dispose()


def test_cli_lists_shows_and_decides(gate_server: LiveServer, recorder: Recorder) -> None:
    approval = check(gate_server, gate_server.admin_key, "rm -rf /tmp/cli").approval
    assert approval is not None
    with gate_server.client(gate_server.admin_key) as api:
        approver = user_key(api, "clicker")
    env = {"LEGATOR_SERVER_URL": gate_server.url, "LEGATOR_API_KEY": approver}
    listed = run_cli("legator", "approvals", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [a["id"] for a in json.loads(listed.stdout)] == [approval.id]
    shown = run_cli("legator", "approvals", "show", approval.id, env=env)
    assert "rm -rf /tmp/cli" in shown.stdout and "risk critical" in shown.stdout
    approved = run_cli(
        "legator", "approvals", "approve", approval.id, "-r", "looks fine", "--json", env=env
    )
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["status"] == "dispatched"
    assert len(recorder.runs()) == 1
    assert run_cli("legator", "approvals", "deny", approval.id, env=env).returncode == 4
    assert run_cli("legator", "approvals", "show", "nope", env=env).returncode == 3
    no_key = run_cli(
        "legator", "approvals", "list", env={"LEGATOR_URL": gate_server.url, "LEGATOR_API_KEY": ""}
    )
    assert no_key.returncode == 2 and "LEGATOR_API_KEY" in no_key.stderr
