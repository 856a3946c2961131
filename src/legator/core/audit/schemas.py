"""Audit API shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class AuditEventOut(BaseModel):
    id: str
    ts: datetime
    actor: str
    action: str
    target: str
    outcome: str
    details: dict[str, Any]
    request_id: str
    hash: str | None = None


class AuditPage(BaseModel):
    events: list[AuditEventOut]
    next_cursor: str | None


class ChainReport(BaseModel):
    chained: bool
    ok: bool
    checked: int
    unchained: int
    first_break: str | None = None
    anchor: str | None = None
    # The newest chained event, as HASH@TIME and by id: keep the head elsewhere and pass
    # it back to verify, which then fails if that event was deleted (see docs/api.md).
    head: str | None = None
    head_event: str | None = None
    message: str


class PurgeOut(BaseModel):
    deleted: int
    cutoff: datetime
    anchor: str
