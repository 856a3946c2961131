"""Single sign-on: send the browser to the provider, and on its way back check everything,
find or create the user by its stable link (issuer + ``sub``) and open the same session a
password sign-in opens; or, when a signed-in user started it, link the identity to that user.
No HTTP here: the router turns results into redirects and cookies."""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from legator.core.auth.models import OidcPending, User, UserIdentity
from legator.core.auth.oidc_provider import IdentityClaims, OidcError, OidcProvider
from legator.core.auth.schemas import USERNAME_RE, UserOut
from legator.core.auth.service import SYSTEM_ACTOR, AuthService
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
# Names a provider's user never gets: the first admin's, and the actors the audit log uses
# for the system itself, so that no one can sign in as something that looks like them.
RESERVED_USERNAMES = frozenset(
    {"admin", "administrator", "root", "system", "cli", "anonymous", "leger-device-login"}
)

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

# What a pending sign-in is for.
LOGIN = "login"
LINK = "link"

_NOT_USERNAME = re.compile(r"[^a-z0-9._@-]+")
_NUMBERED = re.compile(r"-[0-9]+$")


@dataclass(frozen=True)
class SignInStart:
    redirect_url: str
    browser_token: str  # for a short-lived HttpOnly cookie: binds the sign-in to this browser


@dataclass(frozen=True)
class SignedIn:
    session_token: str
    user: UserOut
    next_path: str


@dataclass(frozen=True)
class Linked:
    """The identity is now linked to the signed-in user (or already was)."""

    username: str
    issuer: str
    next_path: str


class LinkRefused(OidcError):
    """A link (not a sign-in) was refused: the browser is still signed in as before."""


@dataclass(frozen=True)
class _Pending:
    browser_hash: str
    nonce: str
    code_verifier: str
    next_path: str
    expires_at: datetime
    intent: str
    user_id: str | None


@dataclass(frozen=True)
class Callback:
    """What came back from the provider, and from whom."""

    state: str
    code: str
    error: str
    browser_token: str | None
    user_agent: str = ""
    client_ip: str = ""
    session_user_id: str | None = None  # whom this browser's session cookie signs in, if any


def username_candidate(identity: IdentityClaims) -> str:
    """A valid username from preferred_username, else the e-mail address when the provider
    vouches for it, else the subject. Never a reserved name: a provider's user calling
    itself "admin" or "system" gets the subject-based name instead."""
    claims = identity.claims
    email = claims.get("email") if claims.get("email_verified") is True else None
    for source in (claims.get("preferred_username"), email):
        if isinstance(source, str):
            name = _NOT_USERNAME.sub("-", source.strip().lower())
            name = name.lstrip("._@-")[:64]
            if USERNAME_RE.match(name) and not _reserved(name):
                return name
    return "sso-" + sha256_hex(f"{identity.issuer}|{identity.subject}")[:12]


def _reserved(name: str) -> bool:
    # "admin-2" is what a taken name becomes: it would pass for the first admin's too.
    return _NUMBERED.sub("", name) in RESERVED_USERNAMES


def client_key(client_ip: str) -> str:
    """Whom to count attempts against: the address, or its /64 for IPv6 (one machine
    commonly holds a whole /64)."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class AttemptLimiter:
    """At most ``limit`` attempts per client in a sliding ``window_s``, kept in memory (per
    replica) for at most ``max_clients`` clients: past that, new clients are refused until
    some are forgotten."""

    def __init__(self, limit: int, window_s: float, *, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._seen: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._seen.get(client)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def over(self, client: str) -> bool:
        """Whether ``client`` has used up its attempts."""
        times = self._recent(client, time.monotonic())
        return times is not None and len(times) >= self.limit

    def count(self, client: str) -> bool:
        """Count an attempt; False (and not counted) when ``client`` is over the limit."""
        now = time.monotonic()
        times = self._recent(client, now)
        if times is None:
            if len(self._seen) >= self.max_clients:
                cutoff = now - self.window_s
                for stale in [c for c, t in self._seen.items() if not t or t[-1] <= cutoff]:
                    del self._seen[stale]
                if len(self._seen) >= self.max_clients:
                    return False
            times = self._seen[client] = deque()
        if len(times) >= self.limit:
            return False
        times.append(now)
        return True

    def clear(self) -> None:
        self._seen.clear()


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
                    intent=LOGIN if link_user_id is None else LINK,
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
            linking = pending is not None and pending.intent == LINK
            username = exc.username
            if linking and username is None and pending is not None and pending.user_id:
                username = await self._username_of(pending.user_id)
            log.warning(
                "single sign-on refused",
                reason=exc.reason,
                detail=str(exc),
                intent=pending.intent if pending else None,
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
                    "user_agent": callback.user_agent,
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
            if not callback.state or len(callback.state) > 512:
                raise OidcError(BAD_STATE, "the callback carries no valid state")
            raise OidcError(BAD_STATE, "unknown or already used sign-in state")
        if pending.expires_at <= utcnow():
            raise OidcError(BAD_STATE, "the sign-in took longer than ten minutes")
        browser_token = callback.browser_token
        if not browser_token or not constant_time_equal(
            sha256_hex(browser_token), pending.browser_hash
        ):
            # Someone else's callback link (login CSRF), or the cookie is gone.
            raise OidcError(BAD_STATE, "the sign-in was started in another browser")
        if pending.intent == LINK and (
            pending.user_id is None or callback.session_user_id != pending.user_id
        ):
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
        if pending.intent == LINK and pending.user_id is not None:
            return await self._link(identity, pending.user_id, pending.next_path, callback)
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
                        OidcPending.intent,
                        OidcPending.user_id,
                    )
                )
            ).first()
        if row is None:
            return None
        browser_hash, nonce, verifier, next_path, expires_at, intent, user_id = row
        return _Pending(
            browser_hash=browser_hash,
            nonce=nonce,
            code_verifier=verifier,
            next_path=next_path,
            expires_at=expires_at,
            intent=intent,
            user_id=user_id,
        )

    async def _username_of(self, user_id: str) -> str | None:
        async with self.db.session() as session:
            return await session.scalar(select(User.username).where(User.id == user_id))

    # ----- linking -----------------------------------------------------------------------

    async def _link(
        self, identity: IdentityClaims, user_id: str, next_path: str, callback: Callback
    ) -> Linked:
        """Attach (issuer, sub) to the user who asked: refused when it belongs to someone
        else or the user already has another identity at this provider; nothing to do when
        it is theirs already."""
        try:
            return await self._attach(identity, user_id, next_path, callback)
        except IntegrityError:
            # Someone linked (or signed in with) this identity at the same moment: look again.
            return await self._attach(identity, user_id, next_path, callback)

    async def _attach(
        self, identity: IdentityClaims, user_id: str, next_path: str, callback: Callback
    ) -> Linked:
        async with self.db.write() as session:
            user = await session.get(User, user_id)
            if user is None or user.disabled:
                raise OidcError(
                    SESSION_CHANGED if user is None else DISABLED,
                    "the user who started the link no longer exists"
                    if user is None
                    else "the user who started the link is disabled",
                    username=user.username if user is not None else None,
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
                    "user_agent": callback.user_agent,
                },
            )
            return Linked(username=user.username, issuer=identity.issuer, next_path=next_path)

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
            claims = identity.claims
            email = claims.get("email") if claims.get("email_verified") is True else None
            name = claims.get("name")
            user = User(
                username=await _free_username(session, username_candidate(identity), retry),
                role=self.default_role,
                display_name=name[:200] if isinstance(name, str) else "",
                email=email if isinstance(email, str) and len(email) <= 320 else None,
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


async def _free_username(session: AsyncSession, wanted: str, retry: bool = False) -> str:
    """``wanted``, or ``wanted-2``, ``wanted-3``… when taken (cut to fit 64 characters); on
    a ``retry`` after a collision, any free one of those."""
    candidates = [wanted] + [f"{wanted[: 64 - len(str(n)) - 1]}-{n}" for n in range(2, 21)]
    taken = set(
        (await session.scalars(select(User.username).where(User.username.in_(candidates)))).all()
    )
    free = [candidate for candidate in candidates if candidate not in taken]
    if free:
        return secrets.choice(free) if retry else free[0]
    return f"{wanted[:55]}-{secrets.token_hex(4)}"
