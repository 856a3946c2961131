"""What a user created at a first single sign-on is called: a valid, unreserved, free
username drawn from the provider's claims."""

from __future__ import annotations

import re
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from legator.core.auth.models import User
from legator.core.auth.oidc_provider import IdentityClaims
from legator.core.auth.schemas import is_username
from legator.core.auth.service import SYSTEM_ACTOR
from legator.core.security import sha256_hex

# Names a provider's user never gets: the first admin's, and the actors the audit log uses
# for the system itself, so that no one can sign in as something that looks like them.
RESERVED_USERNAMES = frozenset(
    {"admin", "administrator", "root", SYSTEM_ACTOR, "cli", "anonymous", "leger-device-login"}
)

_NOT_USERNAME = re.compile(r"[^a-z0-9._@-]+")
_NUMBERED = re.compile(r"-[0-9]+$")


def verified_email(claims: dict[str, Any]) -> str | None:
    """The e-mail address, only when the provider vouches for it."""
    email = claims.get("email")
    return email if isinstance(email, str) and claims.get("email_verified") is True else None


def username_candidate(identity: IdentityClaims) -> str:
    """A valid username from preferred_username, else the e-mail address when the provider
    vouches for it, else the subject. Never a reserved name, nor one shaped like a user id: a
    provider's user calling itself "admin", "system" or another user's id gets the
    subject-based name instead."""
    claims = identity.claims
    for source in (claims.get("preferred_username"), verified_email(claims)):
        if isinstance(source, str):
            name = _NOT_USERNAME.sub("-", source.strip().lower())
            name = name.lstrip("._@-")[:64]
            if is_username(name) and not _reserved(name):
                return name
    return "sso-" + sha256_hex(f"{identity.issuer}|{identity.subject}")[:12]


def _reserved(name: str) -> bool:
    # "admin-2" is what a taken name becomes: it would pass for the first admin's too.
    return _NUMBERED.sub("", name) in RESERVED_USERNAMES


async def free_username(session: AsyncSession, wanted: str, retry: bool = False) -> str:
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
