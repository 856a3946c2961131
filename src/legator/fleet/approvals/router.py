"""The approval queue over HTTP. The approver is always the authenticated caller."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.http.deps import require
from legator.fleet.approvals.schemas import ApprovalOut, ApprovalStatus, CancelIn, DecideIn
from legator.fleet.approvals.service import ApprovalService

router = APIRouter(prefix="/api/v1/approvals", tags=["approvals"])


def approvals_of(request: Request) -> ApprovalService:
    return request.app.state.approvals  # type: ignore[no-any-return]


@router.get("", response_model=list[ApprovalOut], dependencies=[require(Permission.FLEET_READ)])
async def list_approvals(
    request: Request,
    status: ApprovalStatus | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[ApprovalOut]:
    """Newest first; filter with ``?status=pending``."""
    return await approvals_of(request).list(status, limit)


@router.get(
    "/{approval_id}", response_model=ApprovalOut, dependencies=[require(Permission.FLEET_READ)]
)
async def get_approval(approval_id: str, request: Request) -> ApprovalOut:
    return await approvals_of(request).get(approval_id)


@router.post("/{approval_id}/decide", response_model=ApprovalOut)
async def decide(
    approval_id: str,
    body: DecideIn,
    request: Request,
    principal: Principal = require(Permission.APPROVALS_DECIDE),
) -> ApprovalOut:
    """Approve or deny. An approval that reaches its required approvers is dispatched at once
    (exactly once) and the response carries the dispatch result."""
    return await approvals_of(request).decide(approval_id, principal, body.decision, body.reason)


@router.post("/{approval_id}/cancel", response_model=ApprovalOut)
async def cancel(
    approval_id: str,
    request: Request,
    body: CancelIn | None = None,
    principal: Principal = require(Permission.FLEET_COMMAND),
) -> ApprovalOut:
    """Withdraw a pending request (``fleet:command``, what it takes to request one): its
    requester, or anyone who also holds ``fleet:admin``. Permissions, not the role, decide."""
    reason = body.reason if body else ""
    return await approvals_of(request).cancel(approval_id, principal, reason)
