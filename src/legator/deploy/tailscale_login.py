"""Signing ``leger`` in by Tailscale identity: a request that reaches the control plane over
the tailnet is asked of tailscaled (``whois``), and the Tailscale user it names gets an API
key if a Legator user of the same login name (or e-mail) exists and is enabled."""

from __future__ import annotations

from datetime import timedelta

from legator.core.audit.service import AuditService
from legator.core.auth.schemas import UserOut
from legator.core.auth.service import AuthService
from legator.core.auth.tailscale import WhoIs, WhoIsError, is_tailnet, login_name
from legator.core.db.base import utcnow
from legator.core.errors import NotFound, Unauthorized

KEY_TTL = timedelta(days=30)


class TailscaleLogins:
    def __init__(self, auth: AuthService, audit: AuditService, whois: WhoIs | None) -> None:
        self.auth = auth
        self.audit = audit
        self.whois = whois

    async def login(self, client_ip: str, client_name: str) -> dict[str, object]:
        if self.whois is None:
            raise NotFound(
                "Tailscale sign-in is not enabled here (LEGATOR_TAILSCALE_SOCKET is unset)"
            )
        if not is_tailnet(client_ip):
            raise Unauthorized("this request did not come over the tailnet")
        try:
            who = await self.whois.whois(client_ip)
        except WhoIsError as exc:
            raise Unauthorized(f"tailscaled does not know this peer: {exc}") from None
        name = login_name(who)
        if name is None:
            raise Unauthorized("a tagged device acts for no user; use an API key or a device code")
        user, reason = matching_user(await self.auth.list_users(), name)
        if user is None:
            await self.audit.log(
                actor=f"tailscale:{name}",
                action="deploy.tailscale_login",
                target=f"client:{client_name}",
                outcome="denied",
                details={"client_ip": client_ip, "reason": reason},
            )
            raise Unauthorized(f"{reason}: the Tailscale login {name}")
        key, raw = await self.auth.create_key(
            user.id,
            name=f"leger {client_name} (tailscale)"[:100],
            expires_at=utcnow() + KEY_TTL,
            actor=f"tailscale:{name}",
        )
        return {"api_key": raw, "expires_at": key.expires_at, "username": user.username}


def matching_user(users: list[UserOut], login: str) -> tuple[UserOut | None, str]:
    """The user a Tailscale login stands for: the one of that username (unique), else the one
    user whose e-mail it is. E-mail addresses are not unique (an identity provider vouches for
    its users' own), so one shared by several users names none of them; nor does a disabled
    user's name fall through to another's e-mail. The second value says why none."""
    wanted = login.lower()
    named = next((u for u in users if u.username == wanted), None)
    if named is None:
        by_email = [u for u in users if (u.email or "").lower() == wanted]
        if len(by_email) > 1:
            return None, "several Legator users have this e-mail address; none is chosen"
        named = by_email[0] if by_email else None
    if named is None or named.disabled:
        return None, "no enabled Legator user matches"
    return named, ""
