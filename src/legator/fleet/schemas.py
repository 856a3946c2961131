"""Pydantic I/O of the fleet API."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from legator.fleet.approvals.schemas import ApprovalMode
from legator.fleet.policy.limits import MAX_ENTRIES, MAX_ENTRY_CHARS, MAX_PATH_CHARS
from legator.fleet.protocol import Level

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}\Z")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}\Z")


def check_tags(tags: list[str]) -> list[str]:
    for tag in tags:
        if not _TAG.match(tag):
            raise ValueError(f"tag {tag!r} must be 1-63 letters, digits, '_', '.', ':' or '-'")
    return sorted(set(tags))


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TokenCreated(BaseModel):
    id: str
    token: str
    expires_at: datetime | None
    multi_use: bool
    probe_id: str | None
    install_command: str


class TokenOut(Out):
    id: str
    prefix: str
    multi_use: bool
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    used_count: int
    last_used_at: datetime | None
    probe_id: str | None


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200)
    hostname: str = Field(min_length=1, max_length=253)
    os: str = Field("", max_length=64)
    arch: str = Field("", max_length=32)
    version: str = Field("", max_length=64)
    tags: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("hostname")
    @classmethod
    def _host(cls, value: str) -> str:
        if not _HOST.match(value):
            raise ValueError("hostname may hold letters, digits, '.', '_' and '-' only")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        return check_tags(value)


class Registered(BaseModel):
    probe_id: str
    api_key: str
    policy_id: str
    signing_key: str


class ProbeOut(Out):
    id: str
    hostname: str
    os: str
    arch: str
    version: str
    tags: list[str]
    policy_id: str
    max_level: str | None
    status: str
    connected: bool = False
    registered_at: datetime
    last_seen_at: datetime | None
    metrics: dict[str, Any]


class ProbeDetail(ProbeOut):
    inventory: dict[str, Any]
    inventory_at: datetime | None


class TagsUpdate(BaseModel):
    tags: list[str] = Field(max_length=64)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        return check_tags(value)


class Health(BaseModel):
    probe_id: str
    score: int
    status: str
    reasons: list[str]


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1, max_length=65536)
    args: list[str] = Field(default_factory=list, max_length=1000)
    shell: bool = False
    timeout_s: float = Field(60.0, gt=0, le=86400)
    level: Level | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", name):
                raise ValueError(f"environment variable name {name!r} is not valid")
        return value


CommandMode = Literal["dispatch", "wait", "stream"]


class CommandOut(Out):
    request_id: str = Field(validation_alias="id")
    probe_id: str
    command: str
    args: list[str]
    shell: bool
    level: str
    mode: str
    status: str
    requested_by: str
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    duration_ms: int | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class Dispatched(BaseModel):
    status: Literal["dispatched"] = "dispatched"
    request_id: str
    stream_url: str | None = None


PolicyEntry = Annotated[str, Field(max_length=MAX_ENTRY_CHARS)]
PolicyPath = Annotated[str, Field(max_length=MAX_PATH_CHARS)]


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = Field("", max_length=500)
    level: Level
    # Bounded (policy.limits; the probe checks a pushed policy again): matching a command
    # against a policy costs what these allow.
    allow: list[PolicyEntry] = Field(default_factory=list, max_length=MAX_ENTRIES)
    block: list[PolicyEntry] = Field(default_factory=list, max_length=MAX_ENTRIES)
    paths: list[PolicyPath] = Field(default_factory=list, max_length=MAX_ENTRIES)
    approval_mode: ApprovalMode = Field(
        ApprovalMode.MUTATION_GATE,
        description="none, mutation_gate, every_action or two_person (see docs/guardrails.md).",
    )

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"policy path {path!r} must be absolute")
        return value


class PolicyOut(Out):
    id: str
    name: str
    description: str
    level: str
    allow: list[str]
    block: list[str]
    paths: list[str]
    approval_mode: str
    builtin: bool
    created_at: datetime
    updated_at: datetime


class UpdateRequest(BaseModel):
    url: str = Field(pattern=r"^https?://")
    version: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ProbeActionResult(BaseModel):
    probe_id: str
    ok: bool
    detail: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class FanOutItem(BaseModel):
    probe_id: str
    hostname: str
    ok: bool
    result: CommandOut | None = None
    error: str | None = None


class FanOutResult(BaseModel):
    tag: str
    targets: int
    results: list[FanOutItem]
    decision: Literal["allow", "queue", "deny"] = "allow"
    approval_id: str | None = None
    rationale: dict[str, Any] | None = None


class PendingApproval(BaseModel):
    status: Literal["pending_approval"] = "pending_approval"
    approval_id: str
    rationale: dict[str, Any]


class Summary(BaseModel):
    total: int
    by_status: dict[str, int]
    connected: int
    tags: dict[str, int]
    commands_pending: int
    approvals_pending: int = 0


class ReplicaOut(BaseModel):
    replica: str
    probes: int = Field(description="Probes whose socket that replica holds.")
    last_heard_s: float = Field(description="Seconds since its last message.")


class ClusterStatus(BaseModel):
    enabled: bool = Field(description="False: one process, LEGATOR_NATS_URL unset.")
    replica: str | None = None
    nats_url: str | None = Field(None, description="Without credentials.")
    connected: bool = False
    down_since: datetime | None = None
    local_probes: int = Field(description="Probes whose socket this replica holds.")
    replicas: list[ReplicaOut] = Field(
        default_factory=list, description="The other replicas heard from recently."
    )


class CleanupResult(BaseModel):
    removed: list[str]
