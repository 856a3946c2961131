"""Single sign-on: send the browser to the provider, and on its way back check everything,
find or create the user by its stable link (issuer + ``sub``) and open the same session a
password sign-in opens. No HTTP here: the router turns results into redirects and cookies."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

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

# Why a sign-in failed: short codes for the audit log and the login page.
BAD_STATE = "bad_state"
PROVIDER_ERROR = "provider_error"
MISSING_CODE = "missing_code"
DISABLED = "disabled"

_NOT_USERNAME = re.compile(r"[^a-z0-9._@-]+")


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
class _Pending:
    nonce: str
    code_verifier: str
    next_path: str


@dataclass(frozen=True)
class Callback:
    """What came back from the provider, and from whom."""

    state: str
    code: str
    error: str
    browser_token: str | None
    user_agent: str = ""
    client_ip: str = ""


def username_candidate(identity: IdentityClaims) -> str:
    """A valid username from preferred_username, else the e-mail address, else the subject."""
    for source in (identity.claims.get("preferred_username"), identity.claims.get("email")):
        if isinstance(source, str):
            name = _NOT_USERNAME.sub("-", source.strip().lower())
            name = name.lstrip("._@-")[:64]
            if USERNAME_RE.match(name):
                return name
    return "sso-" + sha256_hex(f"{identity.issuer}|{identity.subject}")[:12]


class OidcLogins:
    def __init__(self, provider: OidcProvider, auth: AuthService, *, default_role: str) -> None:
        self.provider = provider
        self.auth = auth
        self.db = auth.db
        self.audit = auth.audit
        self.default_role = default_role

    # ----- the way out -------------------------------------------------------------------

    async def start(self, next_path: str) -> SignInStart:
        """A new sign-in: its state, nonce and PKCE verifier are kept here, single use, for
        ten minutes; the browser gets the provider's URL and a token to hold in a cookie."""
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
                    expires_at=now + PENDING_TTL,
                )
            )
        return SignInStart(redirect_url=url, browser_token=browser)

    # ----- the way back ------------------------------------------------------------------

    async def finish(self, callback: Callback) -> SignedIn:
        """Check the callback and open a session; every refusal is audited and raised as
        an OidcError."""
        try:
            return await self._finish(callback)
        except OidcError as exc:
            username = exc.username
            log.warning("single sign-on refused", reason=exc.reason, detail=str(exc))
            await self.audit.log(
                actor=username or "anonymous",
                action="auth.login",
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
            raise

    async def _finish(self, callback: Callback) -> SignedIn:
        if callback.error:
            # Still burn the state, so that the same link cannot be tried again.
            await self._consume(callback.state, callback.browser_token, missing_ok=True)
            raise OidcError(PROVIDER_ERROR, f"the provider answered error={callback.error[:64]!r}")
        pending = await self._consume(callback.state, callback.browser_token)
        assert pending is not None
        if not callback.code:
            raise OidcError(MISSING_CODE, "the provider sent no authorization code")
        token = await self.provider.exchange_code(callback.code, pending.code_verifier)
        access_token = token.get("access_token")
        identity = await self.provider.verify_id_token(
            token.get("id_token"),
            nonce=pending.nonce,
            access_token=access_token if isinstance(access_token, str) else None,
        )
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

    async def _consume(
        self, state: str, browser_token: str | None, *, missing_ok: bool = False
    ) -> _Pending | None:
        """Take the pending sign-in for ``state`` out of the table (so it is used once) and
        check that it has not expired and that this browser started it."""
        if not state or len(state) > 512:
            if missing_ok:
                return None
            raise OidcError(BAD_STATE, "the callback carries no valid state")
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
                    )
                )
            ).first()
        if row is None:
            if missing_ok:
                return None
            raise OidcError(BAD_STATE, "unknown or already used sign-in state")
        browser_hash, nonce, verifier, next_path, expires_at = row
        if expires_at <= utcnow():
            raise OidcError(BAD_STATE, "the sign-in took longer than ten minutes")
        if not browser_token or not constant_time_equal(sha256_hex(browser_token), browser_hash):
            # Someone else's callback link (login CSRF), or the cookie is gone.
            raise OidcError(BAD_STATE, "the sign-in was started in another browser")
        return _Pending(nonce=nonce, code_verifier=verifier, next_path=next_path)

    # ----- users -------------------------------------------------------------------------

    async def _user_for(self, identity: IdentityClaims) -> User:
        """The user linked to (issuer, sub), created at the first sign-in. Never linked by
        name or e-mail: whoever controls those at the provider could take an account over."""
        try:
            return await self._find_or_create(identity)
        except IntegrityError:
            # A concurrent first sign-in of the same person created the link: use it.
            return await self._find_or_create(identity)

    async def _find_or_create(self, identity: IdentityClaims) -> User:
        now = utcnow()
        async with self.db.write() as session:
            link = await session.scalar(
                select(UserIdentity).where(
                    UserIdentity.issuer == identity.issuer,
                    UserIdentity.subject == identity.subject,
                )
            )
            if link is not None:
                link.last_login_at = now
                user = await session.get(User, link.user_id)
                assert user is not None  # the link is deleted with its user
                return user
            claims = identity.claims
            email = claims.get("email") if claims.get("email_verified") is True else None
            name = claims.get("name")
            user = User(
                username=await _free_username(session, username_candidate(identity)),
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


async def _free_username(session: AsyncSession, wanted: str) -> str:
    """``wanted``, or ``wanted-2``, ``wanted-3``… when taken (cut to fit 64 characters)."""
    candidates = [wanted] + [f"{wanted[: 64 - len(str(n)) - 1]}-{n}" for n in range(2, 21)]
    taken = set(
        (await session.scalars(select(User.username).where(User.username.in_(candidates)))).all()
    )
    for candidate in candidates:
        if candidate not in taken:
            return candidate
    return f"{wanted[:55]}-{secrets.token_hex(4)}"
