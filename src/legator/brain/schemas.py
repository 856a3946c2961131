"""Request bodies of the brain's HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TaskIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    goal: str = Field(min_length=1, max_length=4000)
    max_steps: int | None = Field(None, ge=1, le=100)
    timeout_s: float | None = Field(None, gt=0, le=86400)


class ChatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=20000)
    session_id: str | None = Field(None, max_length=36)


class FleetChatIn(ChatIn):
    probe: str | None = Field(None, max_length=64)
    tag: str | None = Field(None, max_length=64)
