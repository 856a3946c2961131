"""Who is calling: the result of authentication, handed to every route."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from legator.core.auth.permissions import Permission, permissions_for_role
from legator.core.errors import Forbidden


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
    def unrestricted(self) -> bool:
        """Whether it holds every permission of its role: a session, or a key of scope "*"."""
        return self.permissions >= permissions_for_role(self.role)

    @property
    def actor(self) -> str:
        return self.username


def ensure_may_manage_own_keys(principal: Principal) -> None:
    """A narrow key (say, inference only, pinned to one model) must not list, mint or revoke
    its owner's keys: it could give itself a broader or longer-lived one."""
    if not principal.can(Permission.ACCOUNT):
        raise Forbidden(
            "managing your own keys needs the 'account' permission: sign in, or use a key "
            "of scope '*'"
        )
