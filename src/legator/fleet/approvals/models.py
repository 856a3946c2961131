"""The approvals table. Everything needed to dispatch the action later is stored with it, so
a pending approval survives restarts and is dispatched by whichever process sees it approved."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from legator.core.db.base import Base, UTCDateTime, new_id, utcnow


class Approval(Base):
    __tablename__ = "fleet_approvals"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    status: Mapped[str] = mapped_column(String(16), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # which dispatcher runs it once approved
    summary: Mapped[str] = mapped_column(Text)  # the command line, as a human reads it
    targets: Mapped[list[str]] = mapped_column(JSON, default=list)
    mode: Mapped[str] = mapped_column(String(16))
    risk: Mapped[str] = mapped_column(String(16))
    level: Mapped[str] = mapped_column(String(16))
    required_approvals: Mapped[int] = mapped_column(Integer, default=1)
    rationale: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    decisions: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    requester: Mapped[str] = mapped_column(String(200))
    requester_id: Mapped[str | None] = mapped_column(String(36))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
