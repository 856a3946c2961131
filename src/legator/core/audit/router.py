"""Reading, exporting and verifying the audit trail."""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from legator.core.audit.schemas import AuditPage, ChainReport, PurgeOut
from legator.core.audit.service import AuditFilter, InvalidCursor, InvalidHead
from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.db import utcnow
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
    since = _in_utc("since", since) if since is not None else None
    until = _in_utc("until", until) if until is not None else None
    return AuditFilter(actor, action, target, outcome, since, until)


def _in_utc(name: str, moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise BadRequest(f"{name} needs a timezone, e.g. 2026-01-01T00:00:00Z")
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is in the year 0 in UTC
        raise BadRequest(f"{name} is outside the years 1 to 9999 in UTC") from None


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
async def verify(
    request: Request,
    head: str | None = Query(
        None,
        description="The 'head' of an earlier report, kept elsewhere: fail if that event was "
        "deleted since (the chain alone cannot tell that its newest events were).",
        max_length=100,
    ),
) -> ChainReport:
    """Recompute the HMAC chain from its anchor (needs LEGATOR_AUDIT_CHAIN_KEY)."""
    try:
        return await core_of(request).audit.verify(head)
    except InvalidHead as exc:
        raise BadRequest(str(exc)) from None


@router.get("/export/bundle", dependencies=[require(Permission.AUDIT_READ)])
async def export_bundle(request: Request) -> StreamingResponse:
    """A zip for auditors: events.ndjson, verification.json (the chain report) and
    manifest.json with the SHA-256 of each file."""
    spool = tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024)  # noqa: SIM115 - closed by the stream
    await core_of(request).audit.bundle(spool)
    spool.seek(0)

    async def stream() -> AsyncIterator[bytes]:
        try:
            while chunk := spool.read(1 << 16):
                yield chunk
        finally:
            spool.close()

    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        stream(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="legator-audit-{stamp}.zip"'},
    )


@router.delete("", response_model=PurgeOut)
async def purge(
    request: Request,
    older_than: str = Query(
        description="Delete events older than this: a duration (90d, 12h) or an RFC 3339 time."
    ),
    principal: Principal = require(Permission.AUDIT_ADMIN),
) -> PurgeOut:
    """Retention: delete old events. The purge is itself audited, and the chain stays
    verifiable from the oldest event left."""
    cutoff = parse_cutoff(older_than)
    result = await core_of(request).audit.purge(cutoff, actor=principal.actor)
    return PurgeOut(deleted=result.deleted, cutoff=result.cutoff, anchor=result.anchor)


def parse_cutoff(text: str) -> datetime:
    match = re.fullmatch(r"(\d+)([dhm])", text.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        try:
            span = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}
            return utcnow() - span[unit] * amount
        except OverflowError:  # past the calendar's first year
            raise BadRequest("older_than reaches before the year 1; use a shorter one") from None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest("older_than must be a duration like 90d or an RFC 3339 time") from None
    return _in_utc("older_than", moment)


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
