"""Reservations: exclusive use of the gateway for a time window.

pending → approved → active → completed, plus rejected and cancelled. A tick activates
approved ones whose window has begun, completes active ones whose window has ended and
cancels pending ones that were never approved before their start. It reads only those rows:
however many reservations wait for later, a tick costs the same.

Anyone who may read the gateway may ask for a reservation, so how many one user may have
waiting (``MAX_WAITING_PER_USER``, admins excepted), how far ahead one may start
(``MAX_LEAD``) and how long one lasts (``MAX_LENGTH``) are bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.db import utcnow
from legator.core.errors import BadRequest, Conflict, Forbidden, NotFound, ServiceUnavailable
from legator.core.logging import get_logger
from legator.gateway.models import GatewayReservation
from legator.gateway.schemas import ReservationCreate, ReservationOut

if TYPE_CHECKING:
    from legator.core.runtime import Core

log = get_logger("legator.gateway.reservations")
TICK_S = 5.0
SLOT = timedelta(minutes=30)
BLOCKING = ("approved", "active")
WAITING = ("pending", "approved")  # not begun yet
# Reservations a user (not an admin) may have waiting at once, and how far ahead one may
# start: anyone with gateway:read may ask for one.
MAX_WAITING_PER_USER = 10
MAX_LEAD = timedelta(days=90)
MAX_LENGTH = timedelta(days=7)
# The name under which changes that must not overlap another reservation take turns, across
# replicas: two approvals checked at once would each see no overlap.
TURNS = "gateway-reservations"
# Which admin action moves which state where.
TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "approve": (("pending",), "approved"),
    "reject": (("pending",), "rejected"),
    "activate": (("approved", "pending"), "active"),
    "deactivate": (("active",), "completed"),
    "cancel": (("pending", "approved"), "cancelled"),
}


def _on_boundary(value: datetime) -> bool:
    # In UTC: a zone of a quarter or half hour off (+05:45) would shift the grid.
    return value.minute in (0, 30) and value.second == 0 and value.microsecond == 0


def _validate_window(starts_at: datetime, ends_at: datetime) -> None:
    if starts_at.tzinfo is None or ends_at.tzinfo is None:
        raise BadRequest("starts_at and ends_at need a time zone (e.g. a trailing Z)")
    try:
        starts_at, ends_at = starts_at.astimezone(UTC), ends_at.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:30-05:00 is past the last representable moment
        raise BadRequest("starts_at and ends_at must lie between the years 1 and 9999") from None
    if not (_on_boundary(starts_at) and _on_boundary(ends_at)):
        raise BadRequest("reservations start and end on a 30-minute boundary (:00 or :30)")
    if ends_at - starts_at < SLOT:
        raise BadRequest("a reservation lasts at least 30 minutes")
    if ends_at - starts_at > MAX_LENGTH:
        # Approved, a longer one would shut everyone else out for as long as it lasts.
        raise BadRequest(f"a reservation lasts at most {MAX_LENGTH.days} days")
    now = utcnow()
    if starts_at <= now:
        raise BadRequest("a reservation must start in the future")
    if starts_at > now + MAX_LEAD:
        raise BadRequest(f"a reservation must start within {MAX_LEAD.days} days from now")


def _due(now: datetime) -> ColumnElement[bool]:
    """The rows a tick changes: waiting ones whose start has passed (approved ones begin,
    or end if their end passed too; pending ones lapse), active ones whose end has passed.
    Each side narrows by an indexed column (state, starts_at)."""
    return or_(
        and_(GatewayReservation.state.in_(WAITING), GatewayReservation.starts_at <= now),
        and_(GatewayReservation.state == "active", GatewayReservation.ends_at <= now),
    )


def is_service(principal: Principal) -> bool:
    return principal.method == "service" or bool(
        (principal.key_attributes.get("gateway") or {}).get("service")
    )


class Reservations:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.active: ReservationOut | None = None
        self.written: list[Callable[[], None]] = []  # called after each change this replica makes

    async def load(self) -> None:
        await self.tick()

    def check(self, principal: Principal) -> None:
        active = self.active
        if active is None or active.user_id_matches(principal) or is_service(principal):
            return
        if active.ends_at <= utcnow():
            return  # the tick will complete it; never block past the end
        raise ServiceUnavailable(
            f"the gateway is reserved until {active.ends_at.isoformat()}",
            headers={"Retry-After": str(max(1, int((active.ends_at - utcnow()).total_seconds())))},
        )

    async def _another_active(self, session: AsyncSession) -> bool:
        found = await session.scalar(
            select(GatewayReservation.id).where(GatewayReservation.state == "active").limit(1)
        )
        return found is not None

    async def _overlaps(
        self, session: AsyncSession, starts_at: datetime, ends_at: datetime, skip: str = ""
    ) -> bool:
        found = await session.scalar(
            select(GatewayReservation.id).where(
                GatewayReservation.state.in_(BLOCKING),
                GatewayReservation.starts_at < ends_at,
                GatewayReservation.ends_at > starts_at,
                GatewayReservation.id != skip,
            )
        )
        return found is not None

    async def create(
        self, data: ReservationCreate, principal: Principal, *, user_id: str, username: str
    ) -> ReservationOut:
        _validate_window(data.starts_at, data.ends_at)
        async with self.core.db.write(turns=TURNS) as session:
            if not principal.can(Permission.GATEWAY_ADMIN):
                waiting = await session.scalar(
                    select(func.count())
                    .select_from(GatewayReservation)
                    .where(
                        GatewayReservation.user_id == user_id,
                        GatewayReservation.state.in_(WAITING),
                        GatewayReservation.ends_at > utcnow(),
                    )
                )
                if (waiting or 0) >= MAX_WAITING_PER_USER:
                    raise Conflict(
                        f"you have {waiting} pending or approved reservations, the most one "
                        f"user may have ({MAX_WAITING_PER_USER}): cancel one first"
                    )
            if await self._overlaps(session, data.starts_at, data.ends_at):
                raise Conflict("that window overlaps an approved or active reservation")
            row = GatewayReservation(
                user_id=user_id,
                username=username,
                starts_at=data.starts_at,
                ends_at=data.ends_at,
                reason=data.reason,
            )
            session.add(row)
            await session.flush()
            await self.core.audit.record(
                session,
                actor=principal.actor,
                action="gateway.reservation.create",
                target=f"reservation:{row.id}",
                details={"starts_at": data.starts_at.isoformat(), "user": username},
            )
            out = ReservationOut.model_validate(row)
        await self._publish("created", out)
        return out

    async def list(self, user_id: str | None = None) -> list[ReservationOut]:
        query = select(GatewayReservation).order_by(GatewayReservation.starts_at)
        if user_id is not None:
            query = query.where(GatewayReservation.user_id == user_id)
        async with self.core.db.session() as session:
            rows = (await session.scalars(query)).all()
        return [ReservationOut.model_validate(r) for r in rows]

    async def transition(
        self, reservation_id: str, action: str, principal: Principal, *, admin: bool
    ) -> ReservationOut:
        sources, target = TRANSITIONS[action]
        async with self.core.db.write(turns=TURNS) as session:
            row = await session.get(GatewayReservation, reservation_id, with_for_update=True)
            if row is None or (not admin and row.user_id != principal.user_id):
                raise NotFound(f"reservation {reservation_id!r} does not exist")
            if row.state not in sources:
                raise Conflict(f"cannot {action} a reservation that is {row.state}")
            if target == "active":
                # Activated ahead of its window, it holds from now on: what lies between now
                # and its start must not be someone else's.
                row.starts_at = min(row.starts_at, utcnow())
            if target in BLOCKING and await self._overlaps(
                session, row.starts_at, row.ends_at, skip=row.id
            ):
                raise Conflict("that window overlaps an approved or active reservation")
            if target == "active" and await self._another_active(session):
                raise Conflict("another reservation is active")
            row.state = target
            if action in ("approve", "reject"):
                row.decided_by = principal.actor
            await self.core.audit.record(
                session,
                actor=principal.actor,
                action=f"gateway.reservation.{action}",
                target=f"reservation:{row.id}",
            )
            out = ReservationOut.model_validate(row)
        await self.refresh_active()
        await self._publish(target, out)
        return out

    async def delete(self, reservation_id: str, principal: Principal) -> None:
        async with self.core.db.write() as session:
            row = await session.get(GatewayReservation, reservation_id)
            if row is None:
                raise NotFound(f"reservation {reservation_id!r} does not exist")
            await session.delete(row)
            await self.core.audit.record(
                session,
                actor=principal.actor,
                action="gateway.reservation.delete",
                target=f"reservation:{reservation_id}",
            )
            out = ReservationOut.model_validate(row)
        await self.refresh_active()
        await self._publish("deleted", out)

    async def tick(self) -> None:
        now = utcnow()
        changed: list[ReservationOut] = []
        # Usually nothing is due: found with a read, so no write lock is taken for nothing.
        async with self.core.db.session() as session:
            due = await session.scalar(select(GatewayReservation.id).where(_due(now)).limit(1))
        if due is not None:
            changed = await self._advance(now)
        await self.refresh_active()
        for out in changed:
            await self._publish(out.state, out)

    async def _advance(self, now: datetime) -> list[ReservationOut]:
        changed: list[ReservationOut] = []
        async with self.core.db.write(turns=TURNS) as session:
            rows = (
                await session.scalars(
                    select(GatewayReservation)
                    .where(_due(now))
                    # Every replica ticks, taking turns: the next finds the rows changed.
                    # In time order, so one that ends is completed before the next begins.
                    .order_by(GatewayReservation.starts_at)
                )
            ).all()
            for row in rows:
                new = None
                if (row.state == "active" and row.ends_at <= now) or (
                    row.state == "approved" and row.ends_at <= now
                ):
                    new = "completed"
                elif row.state == "approved" and row.starts_at <= now:
                    if await self._another_active(session):
                        continue  # begins when the one still active ends
                    new = "active"
                elif row.state == "pending" and row.starts_at <= now:
                    new = "cancelled"
                if new is not None:
                    row.state = new
                    await self.core.audit.record(
                        session,
                        actor="system",
                        action=f"gateway.reservation.{new}",
                        target=f"reservation:{row.id}",
                    )
                    changed.append(ReservationOut.model_validate(row))
        return changed

    async def refresh_active(self) -> None:
        async with self.core.db.session() as session:
            row = await session.scalar(
                select(GatewayReservation).where(GatewayReservation.state == "active")
            )
        self.active = ReservationOut.model_validate(row) if row else None

    async def _publish(self, change: str, out: ReservationOut) -> None:
        await self.core.events.publish(f"gateway.reservation.{change}", out.event())
        for hook in self.written:
            hook()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.tick()
            except Exception:
                log.exception("reservation tick failed")


def ensure_own(principal: Principal, admin: bool, user: str | None) -> None:
    if user is not None and not admin:
        raise Forbidden("only admins act for another user")
