"""Enrolment tokens: created by an operator, consumed by ``POST /register``."""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from legator.core.audit.service import AuditService
from legator.core.db import Database, utcnow
from legator.core.errors import NotFound
from legator.core.security import sha256_hex
from legator.fleet.models import EnrolmentToken

TOKEN_PREFIX = "prb_"  # noqa: S105 - a prefix, not a secret


class TokenService:
    def __init__(self, db: Database, audit: AuditService, ttl_s: int) -> None:
        self.db = db
        self.audit = audit
        self.ttl_s = ttl_s

    async def create(
        self, *, actor: str, multi_use: bool, no_expiry: bool
    ) -> tuple[EnrolmentToken, str]:
        raw = TOKEN_PREFIX + secrets.token_hex(24)
        row = EnrolmentToken(
            prefix=raw[:10],
            token_hash=sha256_hex(raw),
            multi_use=multi_use,
            created_by=actor,
            expires_at=None if no_expiry else utcnow() + timedelta(seconds=self.ttl_s),
        )
        async with self.db.write() as session:
            session.add(row)
            await session.flush()
            await self.audit.record(
                session,
                actor=actor,
                action="fleet.token.create",
                target=row.id,
                details={
                    "multi_use": multi_use,
                    "expires_at": row.expires_at.isoformat() if row.expires_at else None,
                },
            )
        return row, raw

    async def list(self) -> list[EnrolmentToken]:
        async with self.db.session() as session:
            rows = await session.scalars(
                select(EnrolmentToken).order_by(EnrolmentToken.created_at.desc())
            )
            return list(rows)

    async def delete(self, token_id: str, *, actor: str) -> None:
        async with self.db.write() as session:
            result = await session.execute(
                delete(EnrolmentToken).where(EnrolmentToken.id == token_id)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(f"no enrolment token with id {token_id}")
            await self.audit.record(
                session, actor=actor, action="fleet.token.delete", target=token_id
            )

    @staticmethod
    async def consume(session: AsyncSession, raw: str) -> bool:
        """Use the token inside the caller's write transaction. A single UPDATE with the
        conditions in its WHERE clause, so two concurrent registrations cannot both win."""
        now = utcnow()
        result = await session.execute(
            update(EnrolmentToken)
            .where(
                EnrolmentToken.token_hash == sha256_hex(raw),
                or_(EnrolmentToken.expires_at.is_(None), EnrolmentToken.expires_at > now),
                or_(EnrolmentToken.multi_use, and_(EnrolmentToken.used_count == 0)),
            )
            .values(used_count=EnrolmentToken.used_count + 1, last_used_at=now)
        )
        return result.rowcount == 1  # type: ignore[attr-defined]
