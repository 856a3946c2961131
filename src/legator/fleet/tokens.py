"""Enrolment tokens: created by an operator, consumed by ``POST /register``.

A token enrols new hostnames only; a hostname already enrolled needs a re-enrolment token,
bound to its probe, so that no token handed out for new hosts can take over an existing one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from legator.core.audit.service import AuditService
from legator.core.db import Database, utcnow
from legator.core.errors import BadRequest, NotFound
from legator.core.security import sha256_hex
from legator.fleet.models import EnrolmentToken, Probe

TOKEN_PREFIX = "prb_"  # noqa: S105 - a prefix, not a secret


@dataclass(frozen=True, slots=True)
class Consumed:
    """A token that was just used: ``probe_id`` is the probe it re-enrols, if it is bound."""

    token_id: str
    probe_id: str | None


class TokenService:
    def __init__(self, db: Database, audit: AuditService, ttl_s: int) -> None:
        self.db = db
        self.audit = audit
        self.ttl_s = ttl_s

    async def create(
        self, *, actor: str, multi_use: bool, no_expiry: bool, probe_id: str | None = None
    ) -> tuple[EnrolmentToken, str]:
        if probe_id is not None and (multi_use or no_expiry):
            # A standing credential for one host's identity is what this design keeps away.
            raise BadRequest(
                "a re-enrolment token (probe_id) is single-use and expires: "
                "drop multi_use and no_expiry"
            )
        raw = TOKEN_PREFIX + secrets.token_hex(24)
        row = EnrolmentToken(
            prefix=raw[:10],
            token_hash=sha256_hex(raw),
            multi_use=multi_use,
            created_by=actor,
            expires_at=None if no_expiry else utcnow() + timedelta(seconds=self.ttl_s),
            probe_id=probe_id,
        )
        async with self.db.write() as session:
            if probe_id is not None and await session.get(Probe, probe_id) is None:
                raise NotFound(f"no probe with id {probe_id}")
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
                    "probe_id": probe_id,
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
    async def consume(session: AsyncSession, raw: str) -> Consumed | None:
        """Use the token inside the caller's write transaction (a rollback gives the use
        back). A single UPDATE with the conditions in its WHERE clause, so two concurrent
        registrations cannot both win."""
        now = utcnow()
        digest = sha256_hex(raw)
        result = await session.execute(
            update(EnrolmentToken)
            .where(
                EnrolmentToken.token_hash == digest,
                or_(EnrolmentToken.expires_at.is_(None), EnrolmentToken.expires_at > now),
                or_(EnrolmentToken.multi_use, and_(EnrolmentToken.used_count == 0)),
            )
            .values(used_count=EnrolmentToken.used_count + 1, last_used_at=now)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
        row = (
            await session.execute(
                select(EnrolmentToken.id, EnrolmentToken.probe_id).where(
                    EnrolmentToken.token_hash == digest
                )
            )
        ).one()
        return Consumed(row.id, row.probe_id)
