"""Reading, exporting and verifying the audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from legator.core.audit.schemas import AuditPage, ChainReport
from legator.core.audit.service import AuditFilter, InvalidCursor
from legator.core.auth.permissions import Permission
from legator.core.errors import BadRequest
from legator.core.http.deps import core_of, require

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


def audit_filter(
    actor: str | None = None,
    action: str | None = Query(None, description="Exact action, or a prefix ending in '*'."),
    target: str | None = None,
    outcome: Literal["success", "failure", "denied", "error"] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> AuditFilter:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise BadRequest(f"{name} needs a timezone, e.g. 2026-01-01T00:00:00Z")
    return AuditFilter(actor, action, target, outcome, since, until)


@router.get("", response_model=AuditPage, dependencies=[require(Permission.AUDIT_READ)])
async def list_events(
    request: Request,
    flt: AuditFilter = Depends(audit_filter),
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = None,
) -> AuditPage:
    """Newest first. Pass ``next_cursor`` back as ``cursor`` for the next page."""
    try:
        events, next_cursor = await core_of(request).audit.query(flt, limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise BadRequest(str(exc)) from None
    return AuditPage(events=events, next_cursor=next_cursor)


@router.get("/verify", response_model=ChainReport, dependencies=[require(Permission.AUDIT_READ)])
async def verify(request: Request) -> ChainReport:
    """Recompute the HMAC chain from its anchor (needs LEGATOR_AUDIT_CHAIN_KEY)."""
    return await core_of(request).audit.verify()


@router.get("/export", dependencies=[require(Permission.AUDIT_READ)])
async def export(
    request: Request,
    flt: AuditFilter = Depends(audit_filter),
    format: Literal["ndjson", "csv"] = "ndjson",
) -> StreamingResponse:
    """Every matching event, oldest first, as NDJSON or CSV."""
    audit = core_of(request).audit
    if format == "csv":
        body, media = audit.export_csv(flt), "text/csv"
    else:
        body, media = audit.export_ndjson(flt), "application/x-ndjson"
    return StreamingResponse(
        body,
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="legator-audit.{format}"'},
    )
