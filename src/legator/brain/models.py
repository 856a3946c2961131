"""Persistent chat sessions: one row per conversation, its messages in the neutral form."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String
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
