"""Signing ``leger`` in by Tailscale identity: a request that reaches the control plane over
the tailnet is asked of tailscaled (``whois``), and the Tailscale user it names gets an API
key if a Legator user of the same login name (or e-mail) exists and is enabled."""

from __future__ import annotations

from datetime import timedelta

from legator.core.audit.service import AuditService
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
        wanted = name.lower()
        user = next(
            (
                u
                for u in await self.auth.list_users()
                if not u.disabled and (u.username == wanted or (u.email or "").lower() == wanted)
            ),
            None,
        )
        if user is None:
            await self.audit.log(
                actor=f"tailscale:{name}",
                action="deploy.tailscale_login",
                target=f"client:{client_name}",
                outcome="denied",
                details={"client_ip": client_ip, "reason": "no matching user"},
            )
            raise Unauthorized(f"no enabled Legator user matches the Tailscale login {name}")
        key, raw = await self.auth.create_key(
            user.id,
            name=f"leger {client_name} (tailscale)"[:100],
            expires_at=utcnow() + KEY_TTL,
            actor=f"tailscale:{name}",
        )
        return {"api_key": raw, "expires_at": key.expires_at, "username": user.username}
