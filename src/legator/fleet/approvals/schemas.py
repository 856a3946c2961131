"""Approval API shapes and the gate's rationale."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    DISPATCHED = "dispatched"


class ApprovalMode(StrEnum):
    NONE = "none"  # never ask
    MUTATION_GATE = "mutation_gate"  # ask for remediate-level or high/critical-risk actions
    EVERY_ACTION = "every_action"  # ask for everything
    TWO_PERSON = "two_person"  # like mutation_gate; high and critical need two approvers


class Decision(BaseModel):
    approver: str
    decision: Literal["approve", "deny"]
    reason: str = ""
    at: datetime


class ApprovalOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: ApprovalStatus
    kind: str
    summary: str
    targets: list[str]
    mode: ApprovalMode
    risk: str
    level: str
    required_approvals: int
    rationale: dict[str, Any]
    decisions: list[Decision]
    requester: str
    reason: str
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None
    dispatched_at: datetime | None
    result: dict[str, Any] | None


class DecideIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "deny"]
    reason: str = Field("", max_length=2000)


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=2000)
