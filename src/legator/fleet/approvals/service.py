"""The approval queue: request, decide, cancel, expire, and dispatch exactly once.

Exactly once: the switch from ``approved`` to ``dispatched`` is one conditional UPDATE, so of
two racing deciders, or a decider and the start-up recovery, only one wins the right to run
the action. An approval that was approved but not yet dispatched when the process stopped is
dispatched by the recovery at the next start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update

from legator.core.audit.service import AuditService
from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.db import Database, utcnow
from legator.core.errors import Conflict, Forbidden, NotFound
from legator.core.events import InMemoryEventBus
from legator.core.logging import get_logger
from legator.fleet.approvals.models import Approval
from legator.fleet.approvals.schemas import ApprovalMode, ApprovalOut, ApprovalStatus
from legator.fleet.risk import CRITICAL, HIGH

log = get_logger("legator.approvals")
# Runs an approved action: gets the approval and the payload stored with it (never shown by
# the API: it may hold environment values).
Dispatcher = Callable[[ApprovalOut, dict[str, Any]], Awaitable[dict[str, Any]]]
REAP_INTERVAL_S = 5.0
S = ApprovalStatus


def required_approvals(mode: ApprovalMode, risk: str) -> int:
    return 2 if mode is ApprovalMode.TWO_PERSON and risk in (HIGH, CRITICAL) else 1


def approvals_short(approval: ApprovalOut, mode: ApprovalMode) -> str:
    """Why ``approval`` does not satisfy ``mode`` as the policy now stands (empty: it does).
    A policy made ``two_person`` after the request was queued asks for two approvers other
    than the requester before a high or critical action runs."""
    needed = required_approvals(mode, approval.risk)
    if needed < 2:
        return ""
    approvers = {d.approver for d in approval.decisions if d.decision == "approve"}
    approvers.discard(approval.requester)
    if len(approvers) >= needed:
        return ""
    return (
        f"the policy ({mode.value}) now needs two approvers other than the requester; "
        f"{len(approvers)} approved"
    )


def to_out(row: Approval) -> ApprovalOut:
    return ApprovalOut.model_validate(row)


class ApprovalService:
    def __init__(
        self, db: Database, audit: AuditService, events: InMemoryEventBus, *, ttl_s: int
    ) -> None:
        self.db = db
        self.audit = audit
        self.events = events
        self.ttl = timedelta(seconds=ttl_s)
        self._dispatchers: dict[str, Dispatcher] = {}

    def register_dispatcher(self, kind: str, dispatcher: Dispatcher) -> None:
        """What runs an approved action of ``kind`` (a command, a fan-out, a job run…)."""
        self._dispatchers[kind] = dispatcher

    # ----- queue ---------------------------------------------------------------------------

    async def request(
        self,
        *,
        kind: str,
        summary: str,
        targets: list[str],
        mode: ApprovalMode,
        risk: str,
        level: str,
        rationale: dict[str, Any],
        payload: dict[str, Any],
        requester: Principal,
        reason: str = "",
    ) -> ApprovalOut:
        if kind not in self._dispatchers:
            raise ValueError(f"no dispatcher registered for {kind!r}")
        now = utcnow()
        async with self.db.write() as session:
            row = Approval(
                status=S.PENDING.value,
                kind=kind,
                summary=summary,
                targets=targets,
                mode=mode.value,
                risk=risk,
                level=level,
                required_approvals=required_approvals(mode, risk),
                rationale=rationale,
                payload=payload,
                decisions=[],
                requester=requester.actor,
                requester_id=requester.user_id,
                reason=reason,
                created_at=now,
                expires_at=now + self.ttl,
            )
            session.add(row)
            await session.flush()
            await self.audit.record(
                session,
                actor=requester.actor,
                action="approval.request",
                target=f"approval:{row.id}",
                details={"kind": kind, "summary": summary, "targets": targets, **rationale},
            )
            out = to_out(row)
        await self._publish("approval.requested", out)
        return out

    async def get(self, approval_id: str) -> ApprovalOut:
        async with self.db.session() as session:
            row = await session.get(Approval, approval_id)
        if row is None:
            raise NotFound(f"approval {approval_id!r} does not exist")
        return to_out(row)

    async def list(
        self, status: ApprovalStatus | None = None, limit: int = 100
    ) -> list[ApprovalOut]:
        query = select(Approval).order_by(Approval.created_at.desc()).limit(limit)
        if status is not None:
            query = query.where(Approval.status == status.value)
        async with self.db.session() as session:
            rows = (await session.scalars(query)).all()
        return [to_out(row) for row in rows]

    async def count_pending(self) -> int:
        query = select(func.count()).select_from(Approval).where(Approval.status == S.PENDING)
        async with self.db.session() as session:
            return int(await session.scalar(query) or 0)

    # ----- decisions ---------------------------------------------------------------------

    async def decide(
        self, approval_id: str, approver: Principal, decision: str, reason: str = ""
    ) -> ApprovalOut:
        """Record ``approver``'s decision (the authenticated identity, never a body field)."""
        now = utcnow()
        expired = False
        async with self.db.write() as session:
            row = await session.get(Approval, approval_id, with_for_update=True)
            if row is None:
                raise NotFound(f"approval {approval_id!r} does not exist")
            if row.status == S.PENDING and row.expires_at <= now:
                row.status, expired = S.EXPIRED.value, True
                await self._audit_expiry(session, row)
            elif row.status != S.PENDING:
                raise Conflict(f"approval {approval_id} is already {row.status}")
            else:
                self._check_approver(row, approver)
                row.decisions = [
                    *row.decisions,
                    {
                        "approver": approver.actor,
                        "decision": decision,
                        "reason": reason,
                        "at": now.isoformat(),
                    },
                ]
                approvals = {d["approver"] for d in row.decisions if d["decision"] == "approve"}
                if decision == "deny":
                    row.status, row.decided_at = S.DENIED.value, now
                elif len(approvals) >= row.required_approvals:
                    row.status, row.decided_at = S.APPROVED.value, now
                await self.audit.record(
                    session,
                    actor=approver.actor,
                    action="approval.decide",
                    target=f"approval:{row.id}",
                    outcome="success" if decision == "approve" else "denied",
                    details={
                        "decision": decision,
                        "reason": reason,
                        "status": row.status,
                        "approvals": len(approvals),
                        "required": row.required_approvals,
                        "summary": row.summary,
                    },
                )
            out = to_out(row)
        if expired:
            await self._publish("approval.expired", out)
            raise Conflict(f"approval {approval_id} expired at {out.expires_at.isoformat()}")
        await self._publish("approval.decided", out)
        if out.status is S.APPROVED:
            return await self.dispatch(out.id) or await self.get(out.id)
        return out

    @staticmethod
    def _check_approver(row: Approval, approver: Principal) -> None:
        is_requester = approver.actor == row.requester or (
            approver.user_id is not None and approver.user_id == row.requester_id
        )
        if row.mode == ApprovalMode.TWO_PERSON and is_requester:
            raise Forbidden("in two-person mode the requester cannot approve their own request")
        if any(d["approver"] == approver.actor for d in row.decisions):
            raise Conflict(f"{approver.actor} has already decided on this approval")

    @staticmethod
    def _check_canceller(row: Approval, principal: Principal) -> None:
        """The requester withdraws with what it takes to request (``fleet:command``); anyone
        else needs ``fleet:admin``. Permissions, not the role: a key scoped narrowly (say,
        inference only) of an admin or of the requester cannot cancel."""
        if principal.can(Permission.FLEET_ADMIN):
            return
        if principal.actor != row.requester:
            raise Forbidden(
                "only the requester or a holder of 'fleet:admin' can cancel an approval"
            )
        if not principal.can(Permission.FLEET_COMMAND):
            raise Forbidden("cancelling your own approval needs the 'fleet:command' permission")

    async def cancel(self, approval_id: str, principal: Principal, reason: str = "") -> ApprovalOut:
        async with self.db.write() as session:
            row = await session.get(Approval, approval_id, with_for_update=True)
            if row is None:
                raise NotFound(f"approval {approval_id!r} does not exist")
            self._check_canceller(row, principal)
            if row.status != S.PENDING:
                raise Conflict(f"approval {approval_id} is already {row.status}")
            row.status, row.decided_at = S.CANCELLED.value, utcnow()
            await self.audit.record(
                session,
                actor=principal.actor,
                action="approval.cancel",
                target=f"approval:{row.id}",
                details={"reason": reason, "summary": row.summary},
            )
            out = to_out(row)
        await self._publish("approval.decided", out)
        return out

    # ----- dispatch ----------------------------------------------------------------------

    async def dispatch(self, approval_id: str) -> ApprovalOut | None:
        """Run an approved action if nobody has: returns None when another caller won."""
        now = utcnow()
        async with self.db.write() as session:
            claimed = await session.execute(
                update(Approval)
                .where(Approval.id == approval_id, Approval.status == S.APPROVED.value)
                .values(status=S.DISPATCHED.value, dispatched_at=now)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None
            row = await session.get(Approval, approval_id)
            assert row is not None
            await self.audit.record(
                session,
                actor="system",
                action="approval.dispatch",
                target=f"approval:{row.id}",
                details={"kind": row.kind, "summary": row.summary, "targets": row.targets},
            )
            approval, payload = to_out(row), dict(row.payload)
        dispatcher = self._dispatchers.get(approval.kind)
        try:
            if dispatcher is None:
                raise RuntimeError(f"no dispatcher for {approval.kind!r}")
            result = await dispatcher(approval, payload)
            outcome = "success"
        except Exception as exc:
            log.exception("approved action failed to dispatch", approval=approval.id)
            result, outcome = {"error": str(exc)}, "error"
        async with self.db.write() as session:
            await session.execute(
                update(Approval).where(Approval.id == approval.id).values(result=result)
            )
            await self.audit.record(
                session,
                actor="system",
                action="approval.result",
                target=f"approval:{approval.id}",
                outcome=outcome,
                details=result,
            )
        final = approval.model_copy(update={"result": result})
        await self._publish("approval.dispatched", final)
        return final

    async def recover(self) -> int:
        """At start: dispatch what was approved but not dispatched before the last stop."""
        async with self.db.session() as session:
            ids = (
                await session.scalars(
                    select(Approval.id).where(Approval.status == S.APPROVED.value)
                )
            ).all()
        done = 0
        for approval_id in ids:
            if await self.dispatch(approval_id) is not None:
                done += 1
        return done

    # ----- expiry ------------------------------------------------------------------------

    async def expire_due(self) -> int:
        now = utcnow()
        expired: list[ApprovalOut] = []
        async with self.db.write() as session:
            rows = (
                await session.scalars(
                    select(Approval).where(
                        Approval.status == S.PENDING.value, Approval.expires_at <= now
                    )
                )
            ).all()
            for row in rows:
                row.status = S.EXPIRED.value
                await self._audit_expiry(session, row)
                expired.append(to_out(row))
        for out in expired:
            await self._publish("approval.expired", out)
        return len(expired)

    async def _audit_expiry(self, session: Any, row: Approval) -> None:
        await self.audit.record(
            session,
            actor="system",
            action="approval.expire",
            target=f"approval:{row.id}",
            outcome="failure",
            details={"summary": row.summary, "expires_at": row.expires_at.isoformat()},
        )

    async def run_reaper(self, interval: float = REAP_INTERVAL_S) -> None:
        while True:
            try:
                await self.expire_due()
            except Exception:
                log.exception("approval reaper failed")
            await asyncio.sleep(interval)

    async def wait(self, approval_id: str, wait_s: float) -> ApprovalOut:
        """Block until the approval leaves ``pending``, and if approved, until its dispatch's
        outcome is stored: the status is ``dispatched`` from the moment a run is claimed,
        before the dispatcher has run (``approval.dispatched`` is published once it has)."""
        with self.events.subscribe("approval.*") as subscription:
            deadline = asyncio.get_running_loop().time() + wait_s
            while True:
                current = await self.get(approval_id)
                claimed_only = current.status is S.DISPATCHED and current.result is None
                if current.status not in (S.PENDING, S.APPROVED) and not claimed_only:
                    return current
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return current
                await subscription.get(wait=min(remaining, 1.0))

    async def _publish(self, topic: str, approval: ApprovalOut) -> None:
        await self.events.publish(
            topic,
            approval.model_dump(mode="json", exclude={"payload"}),
        )
