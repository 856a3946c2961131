"""Single sign-on: send the browser to the provider, and on its way back check everything,
find or create the user by its stable link (issuer + ``sub``) and open the same session a
password sign-in opens; or, when a signed-in user started it, link the identity to that user.
No HTTP here: the router turns results into redirects and cookies."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from legator.core.auth.attempts import AttemptLimiter, client_key
from legator.core.auth.models import OidcPending, User, UserIdentity
from legator.core.auth.oidc_provider import IdentityClaims, OidcError, OidcProvider
from legator.core.auth.oidc_usernames import free_username, username_candidate, verified_email
from legator.core.auth.schemas import UserOut
from legator.core.auth.service import SYSTEM_ACTOR, USER_AGENT_MAX, AuthService
from legator.core.db import utcnow
from legator.core.errors import TooManyRequests
from legator.core.logging import get_logger
from legator.core.security import constant_time_equal, sha256_hex

log = get_logger("legator.auth.oidc")
PENDING_TTL = timedelta(minutes=10)
MAX_PENDING = 10_000  # sign-ins in flight; more is someone filling the table
# Sign-ins one client (an IPv4 address, an IPv6 /64) may start, and failed callbacks it may
# send, per PENDING_TTL: one client alone can neither fill MAX_PENDING nor the audit log.
MAX_ATTEMPTS_PER_CLIENT = 60
CREATE_ATTEMPTS = 5  # tries at creating a user when concurrent first sign-ins collide
# Why a sign-in failed: short codes for the audit log and the login page.
BAD_STATE = "bad_state"
PROVIDER_ERROR = "provider_error"
MISSING_CODE = "missing_code"
DISABLED = "disabled"
TOO_MANY = "too_many_attempts"
NOT_LINKED = "not_linked"  # LEGATOR_OIDC_CREATE_USERS=false and no user has this identity
LINKED_TO_ANOTHER_USER = "linked_to_another_user"
ALREADY_LINKED = "already_linked"  # the user has another identity at this provider
SESSION_CHANGED = "session_changed"  # the linking user is no longer signed in here


@dataclass(frozen=True)
class SignInStart:
    redirect_url: str
    # For a short-lived HttpOnly cookie: binds the sign-in to this browser.
    browser_token: str = field(repr=False)


@dataclass(frozen=True)
class SignedIn:
    session_token: str = field(repr=False)
    user: UserOut
    next_path: str


@dataclass(frozen=True)
class Linked:
    """The identity is now linked to the signed-in user (or already was)."""

    next_path: str


class LinkRefused(OidcError):
    """A link (not a sign-in) was refused: the browser is still signed in as before."""


@dataclass(frozen=True)
class _Pending:
    browser_hash: str
    nonce: str
    code_verifier: str = field(repr=False)
    next_path: str
    expires_at: datetime
    user_id: str | None  # a link for this user; None: a sign-in


@dataclass(frozen=True)
class Callback:
    """What came back from the provider, and from whom."""

    state: str
    code: str = field(repr=False)
    error: str
    browser_token: str | None = field(repr=False)
    user_agent: str = ""
    client_ip: str = ""
    session_user_id: str | None = None  # whom this browser's session cookie signs in, if any


class OidcLogins:
    def __init__(
        self,
        provider: OidcProvider,
        auth: AuthService,
        *,
        default_role: str,
        create_users: bool = True,
    ) -> None:
        self.provider = provider
        self.auth = auth
        self.db = auth.db
        self.audit = auth.audit
        self.default_role = default_role
        self.create_users = create_users
        self.attempts = AttemptLimiter(MAX_ATTEMPTS_PER_CLIENT, PENDING_TTL.total_seconds())

    # ----- the way out -------------------------------------------------------------------

    async def start(
        self, next_path: str, *, client_ip: str = "", link_user_id: str | None = None
    ) -> SignInStart:
        """A new sign-in: its state, nonce and PKCE verifier are kept here, single use, for
        ten minutes; the browser gets the provider's URL and a token to hold in a cookie.
        With ``link_user_id`` (the signed-in user who asked), the way back links the
        identity to that user instead of signing in."""
        if not self.attempts.count(client_key(client_ip)):
            raise TooManyRequests(
                "too many single sign-ins from this address; try again in a few minutes",
                headers={"Retry-After": "60"},
            )
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 characters, within RFC 7636's 43-128
        browser = secrets.token_urlsafe(32)
        try:
            url = await self.provider.authorization_url(
                state=state, nonce=nonce, code_verifier=verifier
            )
        except OidcError as exc:
            log.warning("single sign-on could not start", reason=exc.reason, detail=str(exc))
            raise
        now = utcnow()
        async with self.db.write() as session:
            await session.execute(delete(OidcPending).where(OidcPending.expires_at <= now))
            waiting = await session.scalar(select(func.count()).select_from(OidcPending))
            if (waiting or 0) >= MAX_PENDING:
                raise TooManyRequests(
                    "too many single sign-ins in progress; try again in a few minutes",
                    headers={"Retry-After": "60"},
                )
            session.add(
                OidcPending(
                    state_hash=sha256_hex(state),
                    browser_hash=sha256_hex(browser),
                    nonce=nonce,
                    code_verifier=verifier,
                    next_path=next_path,
                    user_id=link_user_id,
                    expires_at=now + PENDING_TTL,
                )
            )
        return SignInStart(redirect_url=url, browser_token=browser)

    # ----- the way back ------------------------------------------------------------------

    async def finish(self, callback: Callback) -> SignedIn | Linked:
        """Check the callback and open a session (or link the identity, when a signed-in
        user started this); every refusal is audited and raised as an OidcError, a
        LinkRefused for a link. A client past MAX_ATTEMPTS_PER_CLIENT is refused before
        anything is looked at, and that refusal is not audited: it would be one row per
        request."""
        client = client_key(callback.client_ip)
        if self.attempts.over(client):
            # Not even a warning: that too would be one line per request.
            log.debug("single sign-on refused", reason=TOO_MANY, client_ip=callback.client_ip)
            raise OidcError(TOO_MANY, "too many failed sign-ins from this address")
        pending: _Pending | None = None
        try:
            pending = await self._consume(callback.state)
            return await self._finish(callback, pending)
        except OidcError as exc:
            self.attempts.count(client)
            link_user_id = pending.user_id if pending is not None else None
            linking = link_user_id is not None
            username = exc.username
            if username is None and link_user_id is not None:
                username = await self._username_of(link_user_id)
            log.warning(
                "single sign-on refused", reason=exc.reason, detail=str(exc), linking=linking
            )
            await self.audit.log(
                actor=username or "anonymous",
                action="auth.identity.link" if linking else "auth.login",
                target=f"user:{username}" if username else f"oidc:{self.provider.issuer}",
                outcome="failure",
                details={
                    "method": "oidc",
                    "reason": exc.reason,
                    "detail": str(exc),
                    "client_ip": callback.client_ip,
                    "user_agent": callback.user_agent[:USER_AGENT_MAX],
                },
            )
            if linking:
                raise LinkRefused(exc.reason, str(exc), username=username) from exc
            raise

    async def _finish(self, callback: Callback, pending: _Pending | None) -> SignedIn | Linked:
        if callback.error:
            # The state is burnt all the same, so that the same link cannot be tried again.
            raise OidcError(PROVIDER_ERROR, f"the provider answered error={callback.error[:64]!r}")
        if pending is None:
            raise OidcError(
                BAD_STATE,
                "unknown or already used sign-in state"
                if callback.state
                else "the callback carries no state",
            )
        if pending.expires_at <= utcnow():
            raise OidcError(BAD_STATE, "the sign-in took longer than ten minutes")
        browser_token = callback.browser_token
        if not browser_token or not constant_time_equal(
            sha256_hex(browser_token), pending.browser_hash
        ):
            # Someone else's callback link (login CSRF), or the cookie is gone.
            raise OidcError(BAD_STATE, "the sign-in was started in another browser")
        if pending.user_id is not None and callback.session_user_id != pending.user_id:
            # Signed out, or in as someone else, since the link started: whoever is at the
            # keyboard now did not ask for it.
            raise OidcError(
                SESSION_CHANGED, "the user who started the link is no longer signed in here"
            )
        if not callback.code:
            raise OidcError(MISSING_CODE, "the provider sent no authorization code")
        token = await self.provider.exchange_code(callback.code, pending.code_verifier)
        access_token = token.get("access_token")
        identity = await self.provider.verify_id_token(
            token.get("id_token"),
            nonce=pending.nonce,
            access_token=access_token if isinstance(access_token, str) else None,
        )
        if pending.user_id is not None:
            await self._link(identity, pending.user_id, callback)
            return Linked(pending.next_path)
        user = await self._user_for(identity)
        if user.disabled:
            raise OidcError(DISABLED, f"user {user.username!r} is disabled", username=user.username)
        session_token = await self.auth.open_session(
            user,
            user_agent=callback.user_agent,
            client_ip=callback.client_ip,
            details={"method": "oidc", "issuer": identity.issuer},
        )
        return SignedIn(session_token, UserOut.model_validate(user), pending.next_path)

    async def _consume(self, state: str) -> _Pending | None:
        """Take the pending sign-in for ``state`` out of the table, so that it is used once
        (whether or not it then passes the checks); None when there is none."""
        if not state or len(state) > 512:
            return None
        async with self.db.write() as session:
            row = (
                await session.execute(
                    delete(OidcPending)
                    .where(OidcPending.state_hash == sha256_hex(state))
                    .returning(
                        OidcPending.browser_hash,
                        OidcPending.nonce,
                        OidcPending.code_verifier,
                        OidcPending.next_path,
                        OidcPending.expires_at,
                        OidcPending.user_id,
                    )
                )
            ).first()
        return None if row is None else _Pending(**row._mapping)

    async def _username_of(self, user_id: str) -> str | None:
        async with self.db.session() as session:
            return await session.scalar(select(User.username).where(User.id == user_id))

    # ----- linking -----------------------------------------------------------------------

    async def _link(self, identity: IdentityClaims, user_id: str, callback: Callback) -> None:
        """Attach (issuer, sub) to the user who asked: refused when it belongs to someone
        else or the user already has another identity at this provider; nothing to do when
        it is theirs already."""
        try:
            await self._attach(identity, user_id, callback)
        except IntegrityError:
            # Someone linked (or signed in with) this identity at the same moment: look again.
            await self._attach(identity, user_id, callback)

    async def _attach(self, identity: IdentityClaims, user_id: str, callback: Callback) -> None:
        async with self.db.write() as session:
            user = await session.get(User, user_id)
            if user is None:
                raise OidcError(SESSION_CHANGED, "the user who started the link no longer exists")
            if user.disabled:
                raise OidcError(
                    DISABLED, "the user who started the link is disabled", username=user.username
                )
            links = (
                await session.scalars(
                    select(UserIdentity).where(
                        UserIdentity.issuer == identity.issuer,
                        (UserIdentity.subject == identity.subject)
                        | (UserIdentity.user_id == user.id),
                    )
                )
            ).all()
            same = next((link for link in links if link.subject == identity.subject), None)
            others = [link for link in links if link.subject != identity.subject]
            if same is not None and same.user_id != user.id:
                owner = await session.get(User, same.user_id)
                if owner is not None:
                    raise OidcError(
                        LINKED_TO_ANOTHER_USER,
                        f"the identity is already linked to user {owner.username!r}",
                        username=user.username,
                    )
                await session.delete(same)  # orphaned: see _find_or_create
                await session.flush()
                same = None
            if same is None and others:
                raise OidcError(
                    ALREADY_LINKED,
                    "the user is already linked to another identity at this provider",
                    username=user.username,
                )
            if same is None:
                session.add(
                    UserIdentity(user_id=user.id, issuer=identity.issuer, subject=identity.subject)
                )
                await session.flush()
            await self.audit.record(
                session,
                actor=user.username,
                action="auth.identity.link",
                target=f"user:{user.username}",
                details={
                    "method": "oidc",
                    "issuer": identity.issuer,
                    "subject": identity.subject,
                    "unchanged": same is not None,
                    "client_ip": callback.client_ip,
                    "user_agent": callback.user_agent[:USER_AGENT_MAX],
                },
            )

    # ----- users -------------------------------------------------------------------------

    async def _user_for(self, identity: IdentityClaims) -> User:
        """The user linked to (issuer, sub), created at the first sign-in unless
        ``create_users`` is off. Never linked by name or e-mail: whoever controls those at
        the provider could take an account over."""
        for attempt in range(CREATE_ATTEMPTS - 1):
            try:
                return await self._find_or_create(identity, retry=attempt > 0)
            except IntegrityError:
                # A concurrent first sign-in created the link (use it now), or took the
                # username this one chose (choose again, at random among the free ones, so
                # that several people racing for one name do not collide again).
                continue
        return await self._find_or_create(identity, retry=True)

    async def _find_or_create(self, identity: IdentityClaims, *, retry: bool = False) -> User:
        now = utcnow()
        async with self.db.write() as session:
            link = await session.scalar(
                select(UserIdentity).where(
                    UserIdentity.issuer == identity.issuer,
                    UserIdentity.subject == identity.subject,
                )
            )
            if link is not None:
                user = await session.get(User, link.user_id)
                if user is not None:
                    link.last_login_at = now
                    return user
                # The link outlived its user (it is deleted with it, so only if something
                # removed the user behind the application's back): start afresh.
                await session.delete(link)
                await session.flush()
            if not self.create_users:
                raise OidcError(
                    NOT_LINKED,
                    f"no user is linked to sub {identity.subject[:64]!r} and "
                    "LEGATOR_OIDC_CREATE_USERS is false",
                )
            email = verified_email(identity.claims)
            name = identity.claims.get("name")
            user = User(
                username=await free_username(session, username_candidate(identity), retry),
                role=self.default_role,
                display_name=name[:200] if isinstance(name, str) else "",
                email=email if email is not None and len(email) <= 320 else None,
                password_hash=None,
            )
            session.add(user)
            await session.flush()
            session.add(
                UserIdentity(
                    user_id=user.id,
                    issuer=identity.issuer,
                    subject=identity.subject,
                    last_login_at=now,
                )
            )
            await session.flush()
            await self.audit.record(
                session,
                actor=SYSTEM_ACTOR,
                action="user.create",
                target=f"user:{user.username}",
                details={
                    "role": user.role,
                    "via": "oidc",
                    "issuer": identity.issuer,
                    "subject": identity.subject,
                },
            )
            return user
