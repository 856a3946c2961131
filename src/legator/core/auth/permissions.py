"""Permissions and the built-in roles that grant them."""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    PUBLIC = "public"  # no authentication at all
    AUTHENTICATED = "authenticated"  # any signed-in identity
    ACCOUNT = "account"  # manage your own API keys and sign-in identities
    USERS_READ = "users:read"
    USERS_WRITE = "users:write"
    KEYS_ADMIN = "keys:admin"  # manage other users' API keys
    AUDIT_READ = "audit:read"
    AUDIT_ADMIN = "audit:admin"
    EVENTS_READ = "events:read"
    METRICS_READ = "metrics:read"
    FLEET_READ = "fleet:read"
    FLEET_COMMAND = "fleet:command"
    FLEET_ADMIN = "fleet:admin"
    APPROVALS_DECIDE = "approvals:decide"
    GATEWAY_INFER = "gateway:infer"
    GATEWAY_READ = "gateway:read"
    GATEWAY_ADMIN = "gateway:admin"
    SECRETS_READ = "secrets:read"
    SECRETS_WRITE = "secrets:write"
    DEPLOY_READ = "deploy:read"
    DEPLOY_WRITE = "deploy:write"


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"
    AUDITOR = "auditor"


P = Permission
_EVERYONE = {P.AUTHENTICATED, P.ACCOUNT, P.GATEWAY_INFER, P.GATEWAY_READ}

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.OPERATOR: frozenset(
        _EVERYONE
        | {
            P.EVENTS_READ,
            P.FLEET_READ,
            P.FLEET_COMMAND,
            P.APPROVALS_DECIDE,
            P.SECRETS_READ,
            P.SECRETS_WRITE,
            P.DEPLOY_READ,
            P.DEPLOY_WRITE,
        }
    ),
    Role.VIEWER: frozenset(_EVERYONE | {P.EVENTS_READ, P.FLEET_READ, P.DEPLOY_READ}),
    Role.AUDITOR: frozenset(
        _EVERYONE | {P.AUDIT_READ, P.EVENTS_READ, P.FLEET_READ, P.METRICS_READ, P.DEPLOY_READ}
    ),
}

# Key scopes: "*" keeps every permission of the key's owner; "inference" is the gateway's
# scope; anything else must name a permission. Only "*" (or "account" by name) lets a key
# manage its owner's keys: a narrow key must not mint itself a broader or longer-lived one.
SCOPE_ALIASES: dict[str, frozenset[Permission]] = {
    "inference": frozenset({P.AUTHENTICATED, P.GATEWAY_INFER}),
}


def permissions_for_role(role: str) -> frozenset[Permission]:
    try:
        return ROLE_PERMISSIONS[Role(role)]
    except ValueError:
        return frozenset({P.AUTHENTICATED})


def validate_scopes(scopes: list[str]) -> list[str]:
    known = {p.value for p in Permission} | set(SCOPE_ALIASES) | {"*"}
    unknown = [scope for scope in scopes if scope not in known]
    if unknown:
        raise ValueError(f"unknown scope(s): {', '.join(sorted(unknown))}")
    return sorted(set(scopes)) or ["*"]


def scoped_permissions(role: str, scopes: list[str]) -> frozenset[Permission]:
    granted = permissions_for_role(role)
    if "*" in scopes:
        return granted
    allowed: set[Permission] = {P.AUTHENTICATED}
    for scope in scopes:
        allowed |= SCOPE_ALIASES.get(scope) or {Permission(scope)}
    return granted & frozenset(allowed)
