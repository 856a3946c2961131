"""Device-code login for ``leger`` (in the style of RFC 8628): the host asks for a code, a
signed-in user approves it in the control plane, the host polls and receives an API key."""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import delete, func, or_, select

from legator.core.audit.service import AuditService
from legator.core.auth.attempts import AttemptLimiter, client_key
from legator.core.auth.principal import Principal
from legator.core.auth.service import AuthService
from legator.core.db import Database
from legator.core.db.base import utcnow
from legator.core.errors import BadRequest, Forbidden, NotFound, TooManyRequests
from legator.core.security import sha256_hex
from legator.deploy.models import DeviceCode

CODE_TTL = timedelta(minutes=10)
KEY_TTL = timedelta(days=30)
POLL_INTERVAL_S = 2
MAX_PENDING = 100
STARTS_PER_CLIENT = 10  # per CODE_TTL, per address (IPv6: per /64)
# No vowels or look-alikes: codes are read aloud and typed.
_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ23456789"


def _user_code() -> str:
    raw = "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return f"{raw[:4]}-{raw[4:]}"


class DeviceLogins:
    def __init__(self, db: Database, audit: AuditService, auth: AuthService) -> None:
        self.db = db
        self.audit = audit
        self.auth = auth
        # One address cannot take the whole MAX_PENDING and lock everyone else out.
        self._starts = AttemptLimiter(STARTS_PER_CLIENT, CODE_TTL.total_seconds())

    async def start(self, client_name: str, client_ip: str) -> dict[str, object]:
        if not self._starts.count(client_key(client_ip)):
            raise TooManyRequests(
                "too many device logins started from this address; try again in a few minutes",
                headers={"Retry-After": str(int(CODE_TTL.total_seconds()))},
            )
        device_code = secrets.token_urlsafe(32)
        now = utcnow()
        async with self.db.write() as session:
            # Spent codes are kept for nothing: a poll with one is told it is unknown.
            await session.execute(
                delete(DeviceCode).where(
                    or_(DeviceCode.expires_at <= now, DeviceCode.status == "consumed")
                )
            )
            pending = await session.scalar(
                select(func.count())
                .select_from(DeviceCode)
                .where(DeviceCode.status == "pending", DeviceCode.expires_at > now)
            )
            if (pending or 0) >= MAX_PENDING:
                raise TooManyRequests("too many pending device logins; try again later")
            row = DeviceCode(
                device_code_hash=sha256_hex(device_code),
                user_code=_user_code(),
                client_name=client_name,
                expires_at=now + CODE_TTL,
            )
            session.add(row)
        return {
            "device_code": device_code,
            "user_code": row.user_code,
            "expires_in": int(CODE_TTL.total_seconds()),
            "interval": POLL_INTERVAL_S,
        }

    async def approve(self, principal: Principal, user_code: str) -> dict[str, object]:
        if principal.user_id is None:
            raise BadRequest("approving a device needs a signed-in user")
        if not principal.unrestricted:
            # The device receives a key with every permission of the approver's role.
            raise Forbidden(
                "approving a device gives it a key with all your permissions: approve it "
                "signed in, or with a key of scope '*'"
            )
        code = user_code.strip().upper()
        async with self.db.write() as session:
            row = await session.scalar(select(DeviceCode).where(DeviceCode.user_code == code))
            if row is None or row.status != "pending" or row.expires_at <= utcnow():
                raise NotFound(f"no pending device login with code {code}")
            row.status = "approved"
            row.user_id = principal.user_id
            row.approved_by = principal.actor
            await self.audit.record(
                session,
                actor=principal.actor,
                action="deploy.device.approve",
                target=f"device-login:{row.id}",
                details={"client": row.client_name},
            )
        return {"approved": True, "client_name": row.client_name}

    async def poll(self, device_code: str) -> dict[str, object]:
        """``pending`` until approved; then the API key, exactly once."""
        async with self.db.write() as session:
            row = await session.scalar(
                select(DeviceCode).where(DeviceCode.device_code_hash == sha256_hex(device_code))
            )
            if row is None or row.status == "consumed":
                raise NotFound("unknown or already used device code")
            if row.expires_at <= utcnow():
                raise BadRequest("the device code expired; run `leger auth login` again")
            if row.status != "approved":
                return {"status": "pending"}
            row.status = "consumed"
            user_id, client = row.user_id, row.client_name
        assert user_id is not None
        expires_at = utcnow() + KEY_TTL
        key, raw = await self.auth.create_key(
            user_id,
            name=f"leger {client}"[:100],
            expires_at=expires_at,
            actor="leger-device-login",
        )
        return {"status": "approved", "api_key": raw, "expires_at": key.expires_at}
