"""Pydantic shapes for users, keys, sessions and the caller's identity."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from legator.core.auth.permissions import Role, validate_scopes

USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}\Z")
# What a user id looks like (a UUID). Users are named by id or by username alike (/users/{ref},
# a key's owner), so a username of that shape could stand for another user.
ID_SHAPED_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
MIN_PASSWORD = 12


def is_username(value: str) -> bool:
    """Whether ``value`` (already lowercased) may name a user."""
    return USERNAME_RE.match(value) is not None and ID_SHAPED_RE.match(value) is None


def check_username(value: str) -> str:
    value = value.strip().lower()
    if ID_SHAPED_RE.match(value):
        raise ValueError("username must not look like a user id (a UUID)")
    if not is_username(value):
        raise ValueError(
            "username must be 1-64 characters: lowercase letters, digits, '.', '_', '@', '-'"
        )
    return value


def check_password(value: str) -> str:
    if len(value) < MIN_PASSWORD:
        raise ValueError(f"password must be at least {MIN_PASSWORD} characters")
    if len(value) > 1024:
        raise ValueError("password must be at most 1024 characters")
    return value


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str
    password: str | None = Field(None, description="Omit for users who sign in through OIDC.")
    role: Role = Role.VIEWER
    display_name: str = Field("", max_length=200)
    email: str | None = Field(None, max_length=320)

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        return check_username(value)

    @field_validator("password")
    @classmethod
    def _password(cls, value: str | None) -> str | None:
        return None if value is None else check_password(value)


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    disabled: bool | None = None
    password: str | None = None
    display_name: str | None = Field(None, max_length=200)
    email: str | None = Field(None, max_length=320)

    @field_validator("password")
    @classmethod
    def _password(cls, value: str | None) -> str | None:
        return None if value is None else check_password(value)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    username: str
    display_name: str
    email: str | None
    role: str
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None
    sso_issuers: list[str] = Field(
        default_factory=list,
        description="Issuers of the single sign-on identities linked to this user.",
    )


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", min_length=1, max_length=100)
    scopes: list[str] = Field(default_factory=lambda: ["*"])
    expires_in_days: int | None = Field(None, ge=1, le=3650)
    user: str | None = Field(None, description="Create for another user (needs keys:admin).")

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        return validate_scopes(value)


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    prefix: str
    user_id: str
    username: str = ""
    scopes: list[str]
    attributes: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself. It is shown this once and never again.")


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class MeOut(BaseModel):
    user_id: str | None
    username: str
    role: str
    method: str
    permissions: list[str]
    key_id: str | None = None
    sso_issuers: list[str] = Field(
        default_factory=list,
        description="Issuers of the single sign-on identities linked to you, when you are a "
        "user (signed in, or one of your API keys).",
    )
