"""Wiring of the approval queue and the gate into the app."""

from __future__ import annotations

from fastapi import FastAPI

from legator.core.runtime import Core
from legator.fleet.approvals.router import router as approvals_router
from legator.fleet.approvals.service import ApprovalService
from legator.fleet.gate import Gate


def install_guardrails(app: FastAPI, core: Core) -> Gate:
    approvals = ApprovalService(core.db, core.audit, core.events, ttl_s=core.settings.approval_ttl)
    gate = Gate(approvals, core.audit, model_network_approval=core.settings.model_network_approval)
    app.state.approvals = approvals
    app.state.gate = gate
    app.include_router(approvals_router)

    async def start() -> None:
        # Anything approved before the last stop but not yet run goes out now, once; in the
        # background, since its probes may still be reconnecting.
        core.spawn(approvals.recover(), name="approval-recovery")
        core.spawn(approvals.run_reaper(), name="approval-reaper")

    core.startup_hooks.append(start)
    return gate
