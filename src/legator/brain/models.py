"""Persistent chat sessions: one row per conversation, its messages in the neutral form."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from legator.core.db.base import Base, UTCDateTime, new_id, utcnow


class ChatSession(Base):
    __tablename__ = "brain_chat_sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    scope: Mapped[str] = mapped_column(String(16))  # probe / fleet
    target: Mapped[str] = mapped_column(String(200), index=True)  # probe id, "tag:x" or "all"
    owner: Mapped[str] = mapped_column(String(200), index=True)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelProfile(Base):
    """A Model Dock profile. The API key lives in the secrets store under ``secret_name``;
    only a masked hint of it is kept here."""

    __tablename__ = "brain_model_profiles"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    provider: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(200))
    base_url: Mapped[str | None] = mapped_column(String(500))
    secret_name: Mapped[str | None] = mapped_column(String(200))
    key_hint: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FeatureRoute(Base):
    """Which profile serves a feature (probe_chat, fleet_chat, task)."""

    __tablename__ = "brain_feature_routes"

    feature: Mapped[str] = mapped_column(String(32), primary_key=True)
    profile_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("brain_model_profiles.id", ondelete="CASCADE")
    )


class ProfileUsage(Base):
    """Requests and tokens per profile (``env`` for the environment fallback) and feature."""

    __tablename__ = "brain_usage"

    profile: Mapped[str] = mapped_column(String(100), primary_key=True)
    feature: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Totals since the profile began: past 32 bits on a busy one.
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
