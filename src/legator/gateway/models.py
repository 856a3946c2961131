"""Gateway tables: the model catalogue, categories, usage rows, reservations and settings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from legator.core.db.base import Base, UTCDateTime, new_id, new_sorted_id, utcnow


class GatewayModel(Base):
    __tablename__ = "gateway_models"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    source_repo: Mapped[str] = mapped_column(String(300), default="")
    backend_kind: Mapped[str] = mapped_column(String(32), default="external")
    backend_url: Mapped[str] = mapped_column(String(500), default="")
    upstream_model: Mapped[str] = mapped_column(String(200), default="")
    context_length: Mapped[int] = mapped_column(Integer, default=4096)
    parallel: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(32), default="ready")
    categories: Mapped[list[str]] = mapped_column(JSON, default=list)
    model_path: Mapped[str] = mapped_column(String(1000), default="")
    gguf: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    runtime_args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class GatewayRuntime(Base):
    """A managed backend (process or container) as last seen: what reconciliation starts from."""

    __tablename__ = "gateway_runtimes"

    model_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="stopped")
    port: Mapped[int | None] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer)
    pid_started: Mapped[float | None] = mapped_column(Float)
    container: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The control plane that runs it ("host:backends directory") and, with several replicas,
    # that replica's name; the owner keeps updated_at fresh while it runs (its lease).
    owner: Mapped[str | None] = mapped_column(String(512))
    replica: Mapped[str | None] = mapped_column(String(64))
    # Where the other replicas forward /v1 requests for it (LEGATOR_REPLICA_URL), if set.
    replica_url: Mapped[str | None] = mapped_column(String(512))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class GatewayCategory(Base):
    __tablename__ = "gateway_categories"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    preferred_model: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class GatewayUsage(Base):
    __tablename__ = "gateway_usage"
    __table_args__ = (
        Index("ix_gateway_usage_user_ts", "user_id", "ts"),
        Index("ix_gateway_usage_ts", "ts"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_sorted_id)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    user_id: Mapped[str | None] = mapped_column(String(36))
    username: Mapped[str] = mapped_column(String(64), default="")
    key_id: Mapped[str | None] = mapped_column(String(36))
    model_id: Mapped[str] = mapped_column(String(100))
    category: Mapped[str | None] = mapped_column(String(100))
    endpoint: Mapped[str] = mapped_column(String(32))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    queued_ms: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[int] = mapped_column(Integer, default=200)


class GatewayReservation(Base):
    __tablename__ = "gateway_reservations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(36), index=True)
    username: Mapped[str] = mapped_column(String(64))
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    decided_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class GatewaySetting(Base):
    __tablename__ = "gateway_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class GatewayDownload(Base):
    """A model file being fetched from a hub; survives restarts so transfers resume."""

    __tablename__ = "gateway_downloads"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    repo: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(500))
    revision: Mapped[str] = mapped_column(String(100), default="main")
    dest: Mapped[str] = mapped_column(String(1000))
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    done_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    error: Mapped[str] = mapped_column(Text, default="")
    sha256: Mapped[str | None] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(String(100))
    backend_kind: Mapped[str] = mapped_column(String(32), default="process")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
