"""Fleet tables: enrolment tokens, probes, policies, commands and their output chunks."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from legator.core.db.base import Base, UTCDateTime, new_id, utcnow


class EnrolmentToken(Base):
    __tablename__ = "fleet_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    multi_use: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    used_count: Mapped[int] = mapped_column(Integer, default=0)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set on a re-enrolment token: it re-enrols this probe only, and goes with it.
    probe_id: Mapped[str | None] = mapped_column(
        ForeignKey("fleet_probes.id", ondelete="CASCADE"), index=True
    )


class Policy(Base):
    __tablename__ = "fleet_policies"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(String(500), default="")
    level: Mapped[str] = mapped_column(String(16))
    allow: Mapped[list[str]] = mapped_column(JSON, default=list)
    block: Mapped[list[str]] = mapped_column(JSON, default=list)
    paths: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Which actions wait for a human: none, mutation_gate, every_action or two_person.
    approval_mode: Mapped[str] = mapped_column(
        String(16), default="mutation_gate", server_default="mutation_gate"
    )
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Probe(Base):
    __tablename__ = "fleet_probes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(253), unique=True)
    os: Mapped[str] = mapped_column(String(64), default="")
    arch: Mapped[str] = mapped_column(String(32), default="")
    version: Mapped[str] = mapped_column(String(64), default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    policy_id: Mapped[str] = mapped_column(String(64), default="observe-only")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    pending_key_hash: Mapped[str | None] = mapped_column(String(64))
    # The signing key's salt (legator.fleet.protocol.derive_probe_key): new at every
    # enrolment and rotation, so an old probe.yaml's signing key stops verifying anything.
    # Empty for probes enrolled before salts existed: their key is the one they were given.
    key_salt: Mapped[str] = mapped_column(String(64), default="", server_default="")
    pending_key_salt: Mapped[str | None] = mapped_column(String(64))  # with pending_key_hash
    max_level: Mapped[str | None] = mapped_column(String(16))  # the probe's own local maximum
    status: Mapped[str] = mapped_column(String(16), default="offline", index=True)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    connected_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    inventory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    inventory_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Command(Base):
    __tablename__ = "fleet_commands"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    probe_id: Mapped[str] = mapped_column(
        ForeignKey("fleet_probes.id", ondelete="CASCADE"), index=True
    )
    command: Mapped[str] = mapped_column(Text)
    args: Mapped[list[str]] = mapped_column(JSON, default=list)
    shell: Mapped[bool] = mapped_column(Boolean, default=False)
    level: Mapped[str] = mapped_column(String(16))
    timeout_s: Mapped[float] = mapped_column(Float)
    mode: Mapped[str] = mapped_column(String(16))  # dispatch / wait / stream
    status: Mapped[str] = mapped_column(String(16), index=True)
    requested_by: Mapped[str] = mapped_column(String(200), default="")
    exit_code: Mapped[int | None] = mapped_column(Integer)
    stdout: Mapped[str] = mapped_column(Text, default="")
    stderr: Mapped[str] = mapped_column(Text, default="")
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CommandChunk(Base):
    __tablename__ = "fleet_command_chunks"
    __table_args__ = (UniqueConstraint("command_id", "seq"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    command_id: Mapped[str] = mapped_column(
        ForeignKey("fleet_commands.id", ondelete="CASCADE"), index=True
    )
    seq: Mapped[int] = mapped_column(Integer)
    stream: Mapped[str] = mapped_column(String(8))
    data: Mapped[str] = mapped_column(Text)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
