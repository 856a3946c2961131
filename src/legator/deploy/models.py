"""Saved deployment configurations: one numbered version per save, per user."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from legator.core.db.base import Base, UTCDateTime, new_id, utcnow


class DeployConfig(Base):
    __tablename__ = "deploy_configs"
    __table_args__ = (UniqueConstraint("owner", "version", name="uq_deploy_configs_owner_version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)  # user id (or username)
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    comment: Mapped[str] = mapped_column(String(500), default="")
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
