"""Who is calling: the result of authentication, handed to every route."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from legator.core.auth.permissions import Permission


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str | None
    username: str
    role: str
    permissions: frozenset[Permission]
    method: str  # "api_key", "session", "anonymous" (auth disabled) or "service"
    key_id: str | None = None
    session_id: str | None = None
    key_attributes: dict[str, Any] = field(default_factory=dict)

    def can(self, permission: Permission) -> bool:
        return permission in self.permissions

    @property
    def actor(self) -> str:
        return self.username
