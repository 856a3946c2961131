"""Sign-in, sign-out, the caller's identity, users (admin) and API keys."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, Response, status

from legator.core.auth.permissions import Permission, scoped_permissions
from legator.core.auth.principal import Principal, ensure_may_manage_own_keys
from legator.core.auth.schemas import (
    KeyCreate,
    KeyCreated,
    KeyOut,
    LoginRequest,
    MeOut,
    UserCreate,
    UserOut,
    UserUpdate,
)
from legator.core.db import utcnow
from legator.core.errors import Forbidden, NotFound, Unauthorized
from legator.core.http.deps import SESSION_COOKIE, core_of, require
from legator.core.http.net import client_ip, is_https

router = APIRouter(prefix="/api/v1", tags=["identity"])
P = Permission


def me_out(principal: Principal, sso_issuers: list[str] | None = None) -> MeOut:
    return MeOut(
        user_id=principal.user_id,
        username=principal.username,
        role=principal.role,
        method=principal.method,
        permissions=sorted(p.value for p in principal.permissions),
        key_id=principal.key_id,
        sso_issuers=sso_issuers or [],
    )


def set_session_cookie(request: Request, response: Response, token: str) -> None:
    core = core_of(request)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=core.settings.session_ttl_hours * 3600,
        httponly=True,
        samesite="lax",
        secure=is_https(request),
        path="/",
    )


@router.post("/auth/login", response_model=MeOut, dependencies=[require(P.PUBLIC)])
async def login(body: LoginRequest, request: Request, response: Response) -> MeOut:
    """Sign in with a password; sets an HttpOnly session cookie valid for 24 hours."""
    core = core_of(request)
    result = await core.auth.login(
        body.username,
        body.password,
        user_agent=request.headers.get("user-agent", ""),
        client_ip=client_ip(request),
    )
    if result is None:
        raise Unauthorized("wrong username or password")
    token, _user = result
    set_session_cookie(request, response, token)
    principal = await core.auth.authenticate_session(token)
    assert principal is not None
    return me_out(principal)


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(
    request: Request, response: Response, principal: Principal = require(P.AUTHENTICATED)
) -> None:
    """End the browser session (a POST from our own origin only)."""
    await core_of(request).auth.logout(principal)
    response.delete_cookie(SESSION_COOKIE, path="/")


@router.get("/me", response_model=MeOut)
async def me(request: Request, principal: Principal = require(P.AUTHENTICATED)) -> MeOut:
    """Who you are; for a user, also the issuers of your linked single sign-on identities."""
    if principal.user_id is None:
        return me_out(principal)
    return me_out(principal, await core_of(request).auth.identity_issuers(principal.user_id))


@router.delete("/me/identities", response_model=MeOut)
async def unlink_my_identities(
    request: Request, principal: Principal = require(P.ACCOUNT)
) -> MeOut:
    """Detach your own single sign-on identities. The session cookie or an API key of yours
    with the `account` permission (scope `*`) may: unlike linking, unlinking grants no
    sign-in. 404 when none is linked; 409 when you have no password, since the identity is
    then your only way to sign in."""
    if principal.user_id is None:
        raise Forbidden("only a user has single sign-on identities to unlink")
    await core_of(request).auth.unlink_identities(
        principal.user_id, actor=principal.actor, keep_a_way_in=True
    )
    return me_out(principal)


# ----- users (admin) ---------------------------------------------------------------------


@router.get("/users", response_model=list[UserOut], dependencies=[require(P.USERS_READ)])
async def list_users(request: Request) -> list[UserOut]:
    return await core_of(request).auth.list_users()


@router.post("/users", response_model=UserOut, status_code=status.HTTP_201_CREATED)
async def create_user(
    body: UserCreate, request: Request, principal: Principal = require(P.USERS_WRITE)
) -> UserOut:
    return await core_of(request).auth.create_user(body, actor=principal.actor)


@router.get("/users/{ref}", response_model=UserOut, dependencies=[require(P.USERS_READ)])
async def get_user(ref: str, request: Request) -> UserOut:
    return await core_of(request).auth.get_user(ref)


@router.patch("/users/{ref}", response_model=UserOut)
async def update_user(
    ref: str, body: UserUpdate, request: Request, principal: Principal = require(P.USERS_WRITE)
) -> UserOut:
    return await core_of(request).auth.update_user(ref, body, actor=principal.actor)


@router.delete("/users/{ref}/identities", response_model=UserOut)
async def unlink_identities(
    ref: str, request: Request, principal: Principal = require(P.USERS_WRITE)
) -> UserOut:
    """Detach the user's single sign-on identities; 404 when there are none."""
    return await core_of(request).auth.unlink_identities(ref, actor=principal.actor)


@router.delete("/users/{ref}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(
    ref: str, request: Request, principal: Principal = require(P.USERS_WRITE)
) -> None:
    await core_of(request).auth.delete_user(ref, actor=principal.actor)


# ----- API keys --------------------------------------------------------------------------


@router.get("/keys", response_model=list[KeyOut])
async def list_keys(
    request: Request,
    user: str | None = None,
    all: bool = False,
    principal: Principal = require(P.AUTHENTICATED),
) -> list[KeyOut]:
    """Your own keys (``account``); ``?all=true`` or ``?user=`` needs ``keys:admin``."""
    if all or (user and user not in (principal.username, principal.user_id)):
        if not principal.can(P.KEYS_ADMIN):
            raise Forbidden("listing other users' keys needs the 'keys:admin' permission")
        return await core_of(request).auth.list_keys(None if all else user)
    ensure_may_manage_own_keys(principal)
    if principal.user_id is None:
        return []
    return await core_of(request).auth.list_keys(principal.user_id)


@router.post("/keys", response_model=KeyCreated, status_code=status.HTTP_201_CREATED)
async def create_key(
    body: KeyCreate, request: Request, principal: Principal = require(P.AUTHENTICATED)
) -> KeyCreated:
    """Create an API key (your own: ``account``; another user's: ``keys:admin``). The response
    holds the key itself, shown this once."""
    auth = core_of(request).auth
    if body.user is not None and body.user not in (principal.username, principal.user_id):
        if not principal.can(P.KEYS_ADMIN):
            raise Forbidden("creating keys for other users needs the 'keys:admin' permission")
        other = await auth.get_user(body.user)
        owner, role = other.id, other.role
    else:
        if principal.user_id is None:
            raise Forbidden("an anonymous caller has no user to own a key; name one in 'user'")
        ensure_may_manage_own_keys(principal)
        # By id: the caller's own row, whatever other user its name might also match.
        owner, role = principal.user_id, principal.role
    if not scoped_permissions(role, body.scopes) <= principal.permissions:
        raise Forbidden("a new key cannot hold permissions that the calling key lacks")
    expires_at = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    key, raw = await auth.create_key(
        owner, name=body.name, scopes=body.scopes, expires_at=expires_at, actor=principal.actor
    )
    return KeyCreated(**key.model_dump(), key=raw)


@router.delete("/keys/{key_id}", response_model=KeyOut)
async def revoke_key(
    key_id: str, request: Request, principal: Principal = require(P.AUTHENTICATED)
) -> KeyOut:
    """Revoke one of your keys (``account``) or, with ``keys:admin``, anyone's."""
    auth = core_of(request).auth
    key = await auth.get_key(key_id)
    if principal.can(P.KEYS_ADMIN):
        return await auth.revoke_key(key.id, actor=principal.actor)
    if key.user_id != principal.user_id:
        raise NotFound(f"API key {key_id!r} does not exist")
    ensure_may_manage_own_keys(principal)
    return await auth.revoke_key(key.id, actor=principal.actor)
