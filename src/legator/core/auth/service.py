"""Users, API keys, sessions and authentication. No HTTP here: routers and CLIs call this."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from legator.core.audit.service import AuditService
from legator.core.auth.attempts import SignInThrottle
from legator.core.auth.models import ApiKey, Session, User, UserIdentity
from legator.core.auth.passwords import PasswordWorker
from legator.core.auth.permissions import Role, permissions_for_role, scoped_permissions
from legator.core.auth.principal import Principal
from legator.core.auth.schemas import KeyOut, UserCreate, UserOut, UserUpdate
from legator.core.db import Database, utcnow
from legator.core.errors import BadRequest, Conflict, NotFound, TooManyRequests
from legator.core.logging import get_logger
from legator.core.security import looks_like_api_key, new_api_key, random_password, sha256_hex

if TYPE_CHECKING:
    from legator.core.cluster import ClusterLink

log = get_logger("legator.auth")
SYSTEM_ACTOR = "system"
LAST_USED_FLUSH_S = 30.0
CREDENTIAL_CACHE_TTL_S = 5.0
CREDENTIAL_CACHE_MAX = 10_000
# What a replica tells the others when a change through it may end credentials.
CREDENTIALS_CHANGED = "credentials-changed"
MAX_LIVE_KEYS = 100  # per user, unrevoked and unexpired: each one is a credential at large
USER_AGENT_MAX = 300  # what a session row keeps; audit entries keep as much
SIGN_IN_WINDOW_S = 300.0
# Guesses at one account from one address, and sign-ins from one address over all accounts
# (generous: one office's users behind a NAT share it), per window.
SIGN_INS_PER_ACCOUNT = 10
SIGN_INS_PER_ADDRESS = 100


@dataclass(frozen=True)
class InitialCredentials:
    username: str
    password: str
    api_key: str


def key_out(key: ApiKey, username: str = "") -> KeyOut:
    out = KeyOut.model_validate(key, from_attributes=True)
    out.username = username
    return out


class _LastUsed:
    """Collects 'key/session was used' marks and writes them in one batch, off the hot path."""

    def __init__(self) -> None:
        self.keys: dict[str, datetime] = {}
        self.sessions: dict[str, datetime] = {}

    def drain(self) -> tuple[dict[str, datetime], dict[str, datetime]]:
        keys, sessions = self.keys, self.sessions
        self.keys, self.sessions = {}, {}
        return keys, sessions


class _CredentialCache:
    """Verified credentials for a few seconds, so that a busy client costs one lookup per
    TTL instead of one per request. Every change made through this service (revoke, disable,
    role change, logout, delete) clears it once committed; a change made by another process
    (the offline CLI) takes effect within the TTL.

    A lookup that read the database before such a change commits must not store what it read
    after the clear: each clear starts a new ``generation``, and ``put`` takes only entries
    read in the current one."""

    def __init__(self, ttl: float = CREDENTIAL_CACHE_TTL_S) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, datetime | None, Principal]] = {}
        self.generation = 0

    def get(self, digest: str, now: datetime) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        stored_at, expires_at, principal = entry
        stale = time.monotonic() - stored_at > self.ttl
        if stale or (expires_at is not None and expires_at <= now):
            self._entries.pop(digest, None)
            return None
        return principal

    def put(
        self, digest: str, expires_at: datetime | None, principal: Principal, generation: int
    ) -> None:
        if generation != self.generation:
            return  # read before a change that has since cleared the cache
        if len(self._entries) >= CREDENTIAL_CACHE_MAX:
            self._entries.clear()
        self._entries[digest] = (time.monotonic(), expires_at, principal)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()


class AuthService:
    def __init__(
        self,
        db: Database,
        audit: AuditService,
        *,
        session_ttl_hours: int = 24,
        cluster: ClusterLink | None = None,
        signing_key: bytes | None = None,
    ) -> None:
        self.db = db
        self.audit = audit
        self.session_ttl = timedelta(hours=session_ttl_hours)
        self._last_used = _LastUsed()
        self._passwords = PasswordWorker()
        # Counted in the database, under the signing key: kept over restarts and shared by
        # replicas with that key. Without one (offline CLI: no sign-ins) a key of this process.
        self._sign_ins = SignInThrottle(
            db,
            signing_key or secrets.token_bytes(32),
            per_account=SIGN_INS_PER_ACCOUNT,
            per_address=SIGN_INS_PER_ADDRESS,
            window_s=SIGN_IN_WINDOW_S,
        )
        self._cache = _CredentialCache()
        self._lookups: dict[str, asyncio.Future[Principal | None]] = {}
        self._cluster = cluster
        if cluster is not None:
            # A key revoked through one replica stops working on the others as well, not
            # only once their cached entry lapses.
            cluster.on_broadcast(CREDENTIALS_CHANGED, lambda _origin, _body: self._forget_here())

    # ----- users -------------------------------------------------------------------------

    async def count_users(self) -> int:
        async with self.db.session() as session:
            return int(await session.scalar(select(func.count()).select_from(User)) or 0)

    async def _user(self, session: AsyncSession, ref: str) -> User:
        """The user of id ``ref``, else of username ``ref``: by id first, so that a username
        equal to another user's id (refused since, but perhaps in an older database) never
        stands for that user."""
        user = await session.get(User, ref) or await session.scalar(
            select(User).where(User.username == ref)
        )
        if user is None:
            raise NotFound(f"user {ref!r} does not exist")
        return user

    async def _user_out(self, session: AsyncSession, user: User) -> UserOut:
        out = UserOut.model_validate(user)
        out.sso_issuers = await self._issuers(session, user.id)
        return out

    async def _issuers(self, session: AsyncSession, user_id: str) -> list[str]:
        query = select(UserIdentity.issuer).where(UserIdentity.user_id == user_id)
        return sorted(set((await session.scalars(query)).all()))

    async def get_user(self, ref: str) -> UserOut:
        async with self.db.session() as session:
            return await self._user_out(session, await self._user(session, ref))

    async def list_users(self) -> list[UserOut]:
        async with self.db.session() as session:
            users = (await session.scalars(select(User).order_by(User.username))).all()
            links = (await session.execute(select(UserIdentity.user_id, UserIdentity.issuer))).all()
        issuers: dict[str, set[str]] = {}
        for user_id, issuer in links:
            issuers.setdefault(user_id, set()).add(issuer)
        out = [UserOut.model_validate(user) for user in users]
        for user_out in out:
            user_out.sso_issuers = sorted(issuers.get(user_out.id, ()))
        return out

    async def identity_issuers(self, user_id: str) -> list[str]:
        """Issuers of the single sign-on identities linked to a user."""
        async with self.db.session() as session:
            return await self._issuers(session, user_id)

    async def unlink_identities(
        self, ref: str, *, actor: str = SYSTEM_ACTOR, keep_a_way_in: bool = False
    ) -> UserOut:
        """Detach every single sign-on identity from a user: the identity's next sign-in
        finds no user (and creates one, unless LEGATOR_OIDC_CREATE_USERS is false). The
        user's sessions stay: to keep someone out, disable them. ``keep_a_way_in`` (a user
        unlinking themselves) refuses when the user has no password, which would leave them
        no way to sign in; an admin may still do it."""
        async with self.db.write() as session:
            user = await self._user(session, ref)
            links = (
                await session.scalars(select(UserIdentity).where(UserIdentity.user_id == user.id))
            ).all()
            if not links:
                raise NotFound(f"user {user.username!r} has no single sign-on identity")
            if keep_a_way_in and user.password_hash is None:
                raise Conflict(
                    "refusing to unlink single sign-on: you have no password, so it is your "
                    "only way to sign in; an administrator can set you a password or unlink it"
                )
            for link in links:
                await session.delete(link)
                await self.audit.record(
                    session,
                    actor=actor,
                    action="auth.identity.unlink",
                    target=f"user:{user.username}",
                    details={"issuer": link.issuer, "subject": link.subject},
                )
            return UserOut.model_validate(user)

    async def create_user(self, data: UserCreate, *, actor: str = SYSTEM_ACTOR) -> UserOut:
        # Hash outside the transaction: argon2 takes tens of milliseconds.
        password_hash = await self._passwords.hash(data.password) if data.password else None
        async with self.db.write() as session:
            if await session.scalar(select(User.id).where(User.username == data.username)):
                raise Conflict(f"user {data.username!r} already exists")
            user = User(
                username=data.username,
                role=data.role.value,
                display_name=data.display_name,
                email=data.email,
                password_hash=password_hash,
            )
            session.add(user)
            await session.flush()
            await self.audit.record(
                session,
                actor=actor,
                action="user.create",
                target=f"user:{user.username}",
                details={"role": user.role},
            )
            return UserOut.model_validate(user)

    async def update_user(
        self, ref: str, data: UserUpdate, *, actor: str = SYSTEM_ACTOR
    ) -> UserOut:
        password_hash = await self._passwords.hash(data.password) if data.password else None
        async with self.db.write() as session:
            user = await self._user(session, ref)
            changes: dict[str, Any] = data.model_dump(exclude_unset=True, exclude={"password"})
            if "role" in changes and changes["role"] is not None:
                changes["role"] = Role(changes["role"]).value
            demoted = changes.get("role") not in (None, Role.ADMIN.value)
            if user.role == Role.ADMIN.value and (changes.get("disabled") or demoted):
                await self._ensure_another_admin(session, user)
            for name, value in changes.items():
                if value is not None:
                    setattr(user, name, value)
            if password_hash:
                user.password_hash = password_hash
            if user.disabled or password_hash:
                await session.execute(Session.__table__.delete().where(Session.user_id == user.id))
            audit_changes = {k: v for k, v in changes.items() if v is not None}
            if password_hash:
                audit_changes["password_changed"] = True
            await self.audit.record(
                session,
                actor=actor,
                action="user.update",
                target=f"user:{user.username}",
                details=audit_changes,
            )
            out = await self._user_out(session, user)
        self._forget_credentials()
        return out

    async def delete_user(self, ref: str, *, actor: str = SYSTEM_ACTOR) -> None:
        async with self.db.write() as session:
            user = await self._user(session, ref)
            if user.role == Role.ADMIN.value:
                await self._ensure_another_admin(session, user)
            await session.delete(user)
            await self.audit.record(
                session, actor=actor, action="user.delete", target=f"user:{user.username}"
            )
        self._forget_credentials()

    async def _ensure_another_admin(self, session: AsyncSession, user: User) -> None:
        others = await session.scalar(
            select(func.count())
            .select_from(User)
            .where(User.role == Role.ADMIN.value, User.disabled.is_(False), User.id != user.id)
        )
        if not others:
            raise Conflict("refusing to remove the last enabled admin")

    async def bootstrap_admin(self) -> InitialCredentials | None:
        """On an empty database, create ``admin`` with a random password and an API key."""
        password = random_password()
        password_hash = await self._passwords.hash(password)
        raw_key = new_api_key()
        async with self.db.write() as session:
            if await session.scalar(select(func.count()).select_from(User)):
                return None
            user = User(username="admin", role=Role.ADMIN.value, password_hash=password_hash)
            session.add(user)
            await session.flush()
            session.add(_new_key_row(user.id, "bootstrap", raw_key, ["*"], None))
            await self.audit.record(
                session,
                actor=SYSTEM_ACTOR,
                action="system.bootstrap",
                target="user:admin",
                details={"created": ["user:admin", "api_key:bootstrap"]},
            )
        return InitialCredentials("admin", password, raw_key)

    # ----- API keys ----------------------------------------------------------------------

    async def create_key(
        self,
        user_ref: str,
        *,
        name: str = "default",
        scopes: Iterable[str] = ("*",),
        expires_at: datetime | None = None,
        attributes: dict[str, Any] | None = None,
        actor: str = SYSTEM_ACTOR,
    ) -> tuple[KeyOut, str]:
        """Returns the key's record and the raw key, which is never stored or shown again."""
        if expires_at is not None and expires_at <= utcnow():
            raise BadRequest("expiry must be in the future")
        raw = new_api_key()
        async with self.db.write() as session:
            user = await self._user(session, user_ref)
            if user.disabled:
                raise BadRequest(f"user {user.username!r} is disabled")
            now = utcnow()
            live = await session.scalar(
                select(func.count())
                .select_from(ApiKey)
                .where(
                    ApiKey.user_id == user.id,
                    ApiKey.revoked_at.is_(None),
                    or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
                )
            )
            if (live or 0) >= MAX_LIVE_KEYS:
                raise Conflict(
                    f"user {user.username!r} already has {MAX_LIVE_KEYS} live API keys; "
                    "revoke some first"
                )
            key = _new_key_row(user.id, name, raw, list(scopes), expires_at, attributes)
            session.add(key)
            await session.flush()
            await self.audit.record(
                session,
                actor=actor,
                action="api_key.create",
                target=f"api_key:{key.id}",
                details={
                    "owner": user.username,
                    "name": name,
                    "prefix": key.prefix,
                    "scopes": key.scopes,
                    "expires_at": expires_at.isoformat() if expires_at else None,
                },
            )
            return key_out(key, user.username), raw

    async def list_keys(self, user_ref: str | None = None) -> list[KeyOut]:
        async with self.db.session() as session:
            query = select(ApiKey, User.username).join(User).order_by(ApiKey.created_at)
            if user_ref is not None:
                user = await self._user(session, user_ref)
                query = query.where(ApiKey.user_id == user.id)
            rows = (await session.execute(query)).all()
        return [key_out(key, username) for key, username in rows]

    async def get_key(self, key_ref: str) -> KeyOut:
        async with self.db.session() as session:
            row = (
                await session.execute(
                    select(ApiKey, User.username)
                    .join(User)
                    .where((ApiKey.id == key_ref) | (ApiKey.prefix == key_ref))
                )
            ).first()
        if row is None:
            raise NotFound(f"API key {key_ref!r} does not exist")
        return key_out(row[0], row[1])

    async def revoke_key(self, key_ref: str, *, actor: str = SYSTEM_ACTOR) -> KeyOut:
        async with self.db.write() as session:
            row = (
                await session.execute(
                    select(ApiKey, User.username)
                    .join(User)
                    .where((ApiKey.id == key_ref) | (ApiKey.prefix == key_ref))
                )
            ).first()
            if row is None:
                raise NotFound(f"API key {key_ref!r} does not exist")
            key, username = row
            if key.revoked_at is None:
                key.revoked_at = utcnow()
                await self.audit.record(
                    session,
                    actor=actor,
                    action="api_key.revoke",
                    target=f"api_key:{key.id}",
                    details={"owner": username, "prefix": key.prefix},
                )
            out = key_out(key, username)
        self._forget_credentials()
        return out

    def _forget_credentials(self) -> None:
        """After a change to who may sign in commits, here and on every other replica."""
        self._forget_here()
        if self._cluster is not None:
            self._cluster.broadcast(CREDENTIALS_CHANGED, {})

    def _forget_here(self) -> None:
        """No credential verified before now is used again, nor is a lookup still under way
        shared with later requests."""
        self._cache.clear()
        self._lookups.clear()

    async def authenticate_key(self, raw: str) -> Principal | None:
        if not looks_like_api_key(raw):
            return None
        digest = sha256_hex(raw)
        now = utcnow()
        cached = self._cache.get(digest, now)
        if cached is not None:
            self._last_used.keys[cached.key_id or ""] = now
            return cached
        # One lookup per key at a time: when the cached entry lapses under load, the
        # concurrent requests of that client share a single query instead of queueing many.
        pending = self._lookups.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup_key(digest, now))
            self._lookups[digest] = pending
            pending.add_done_callback(partial(self._lookup_done, digest))
        return await asyncio.shield(pending)

    def _lookup_done(self, digest: str, lookup: asyncio.Future[Principal | None]) -> None:
        if self._lookups.get(digest) is lookup:
            del self._lookups[digest]

    async def _lookup_key(self, digest: str, now: datetime) -> Principal | None:
        query = (
            select(
                ApiKey.id,
                ApiKey.scopes,
                ApiKey.attributes,
                ApiKey.expires_at,
                ApiKey.revoked_at,
                User.id,
                User.username,
                User.role,
                User.disabled,
            )
            .join(User)
            .where(ApiKey.key_hash == digest)
        )
        generation = self._cache.generation
        async with self.db.session() as session:
            row = (await session.execute(query)).first()
        if row is None:
            return None
        key_id, scopes, attributes, expires_at, revoked_at, user_id, username, role, disabled = row
        if revoked_at is not None or disabled or (expires_at is not None and expires_at <= now):
            return None
        self._last_used.keys[key_id] = now
        principal = Principal(
            user_id=user_id,
            username=username,
            role=role,
            permissions=scoped_permissions(role, scopes),
            method="api_key",
            key_id=key_id,
            key_attributes=attributes or {},
        )
        self._cache.put(digest, expires_at, principal, generation)
        return principal

    # ----- sessions ----------------------------------------------------------------------

    async def login(
        self, username: str, password: str, *, user_agent: str = "", client_ip: str = ""
    ) -> tuple[str, UserOut] | None:
        """Returns (session token, user) or None. Failures are audited without the password;
        TooManyRequests once the address or the account has used up its sign-ins
        (SignInThrottle)."""
        username = username.strip().lower()
        refused = await self._sign_ins.refusal(client_ip, username)
        if refused is not None:
            raise TooManyRequests(
                f"too many sign-in attempts for {refused.whose}; try again in a few minutes",
                headers={"Retry-After": str(int(refused.retry_after_s))},
            )
        async with self.db.session() as session:
            user = await session.scalar(select(User).where(User.username == username))
        ok = await self._passwords.verify(user.password_hash if user else None, password)
        if not ok or user is None or user.disabled:
            reason = "disabled" if ok and user is not None else "bad_credentials"
            await self.audit.log(
                actor=username or "anonymous",
                action="auth.login",
                target=f"user:{username}",
                outcome="failure",
                details={
                    "reason": reason,
                    "client_ip": client_ip,
                    "user_agent": user_agent[:USER_AGENT_MAX],
                },
            )
            return None
        await self._sign_ins.succeeded(client_ip, username)
        token = await self.open_session(
            user, user_agent=user_agent, client_ip=client_ip, details={"method": "password"}
        )
        return token, UserOut.model_validate(user)

    async def open_session(
        self,
        user: User,
        *,
        user_agent: str = "",
        client_ip: str = "",
        details: dict[str, Any] | None = None,
    ) -> str:
        """Start a browser session for a user already authenticated (by password or single
        sign-on) and audit the sign-in; returns the session token, which is stored hashed."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        async with self.db.write() as session:
            session.add(
                Session(
                    user_id=user.id,
                    token_hash=sha256_hex(token),
                    expires_at=now + self.session_ttl,
                    user_agent=user_agent[:USER_AGENT_MAX],
                    client_ip=client_ip[:64],
                )
            )
            await session.execute(update(User).where(User.id == user.id).values(last_login_at=now))
            await self.audit.record(
                session,
                actor=user.username,
                action="auth.login",
                target=f"user:{user.username}",
                details={
                    **(details or {}),
                    "client_ip": client_ip,
                    "user_agent": user_agent[:USER_AGENT_MAX],
                },
            )
        user.last_login_at = now
        return token

    async def authenticate_session(self, token: str) -> Principal | None:
        if not token or len(token) > 128:
            return None
        digest = sha256_hex(token)
        now = utcnow()
        cached = self._cache.get(digest, now)
        if cached is not None:
            self._last_used.sessions[cached.session_id or ""] = now
            return cached
        query = (
            select(Session.id, Session.expires_at, User.id, User.username, User.role, User.disabled)
            .join(User)
            .where(Session.token_hash == digest)
        )
        generation = self._cache.generation
        async with self.db.session() as session:
            row = (await session.execute(query)).first()
        if row is None:
            return None
        session_id, expires_at, user_id, username, role, disabled = row
        if disabled or expires_at <= now:
            return None
        self._last_used.sessions[session_id] = now
        principal = Principal(
            user_id=user_id,
            username=username,
            role=role,
            permissions=permissions_for_role(role),
            method="session",
            session_id=session_id,
        )
        self._cache.put(digest, expires_at, principal, generation)
        return principal

    async def logout(self, principal: Principal) -> None:
        if principal.session_id is None:
            return
        async with self.db.write() as session:
            await session.execute(
                Session.__table__.delete().where(Session.id == principal.session_id)
            )
            await self.audit.record(
                session,
                actor=principal.actor,
                action="auth.logout",
                target=f"user:{principal.username}",
            )
        self._forget_credentials()

    # ----- housekeeping ------------------------------------------------------------------

    async def flush_last_used(self) -> None:
        keys, sessions = self._last_used.drain()
        if not keys and not sessions:
            return
        async with self.db.write() as session:
            for key_id, when in keys.items():
                await session.execute(
                    update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when)
                )
            for session_id, when in sessions.items():
                await session.execute(
                    update(Session).where(Session.id == session_id).values(last_seen_at=when)
                )
            await session.execute(Session.__table__.delete().where(Session.expires_at <= utcnow()))

    async def run_housekeeping(self, interval: float = LAST_USED_FLUSH_S) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush_last_used()
            except Exception:
                log.exception("could not record key and session use")
            try:
                await self._sign_ins.prune()
            except Exception:
                log.exception("could not delete old sign-in counts")


def _new_key_row(
    user_id: str,
    name: str,
    raw: str,
    scopes: list[str],
    expires_at: datetime | None,
    attributes: dict[str, Any] | None = None,
) -> ApiKey:
    return ApiKey(
        user_id=user_id,
        name=name,
        prefix=raw[:12],
        key_hash=sha256_hex(raw),
        scopes=scopes or ["*"],
        attributes=attributes or {},
        expires_at=expires_at,
    )
