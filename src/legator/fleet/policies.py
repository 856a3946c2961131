"""Policies: the three built-ins and custom ones; what a probe may run and read."""

from __future__ import annotations

from sqlalchemy import func, select

from legator.core.audit.service import AuditService
from legator.core.db import Database, new_id
from legator.core.errors import BadRequest, Conflict, NotFound
from legator.fleet.models import Policy, Probe
from legator.fleet.schemas import PolicyIn

BUILTINS = (
    Policy(
        id="observe-only",
        name="observe-only",
        description="Read-only status commands; log files under /var/log.",
        level="observe",
        allow=[],
        block=[],
        paths=["/var/log"],
        builtin=True,
    ),
    Policy(
        id="diagnose",
        name="diagnose",
        description="Observe plus logs, sockets and network probes; /var/log, /etc and /proc.",
        level="diagnose",
        allow=[],
        block=[],
        paths=["/var/log", "/etc", "/proc"],
        builtin=True,
    ),
    Policy(
        id="full-remediate",
        name="full-remediate",
        description="Anything the probe's own maximum allows; every path.",
        level="remediate",
        allow=[],
        block=[],
        paths=["/"],
        builtin=True,
    ),
)
DEFAULT_POLICY_ID = "observe-only"


class PolicyService:
    def __init__(self, db: Database, audit: AuditService) -> None:
        self.db = db
        self.audit = audit
        # Read on every dispatch; written rarely (and only through this service).
        self._cache: dict[str, Policy] = {}

    async def seed(self) -> None:
        async with self.db.write() as session:
            existing = set(await session.scalars(select(Policy.id).where(Policy.builtin)))
            for template in BUILTINS:
                if template.id not in existing:
                    session.add(
                        Policy(
                            id=template.id,
                            name=template.name,
                            description=template.description,
                            level=template.level,
                            allow=list(template.allow),
                            block=list(template.block),
                            paths=list(template.paths),
                            builtin=True,
                        )
                    )

    async def list(self) -> list[Policy]:
        async with self.db.session() as session:
            return list(await session.scalars(select(Policy).order_by(Policy.name)))

    async def get(self, policy_id: str) -> Policy:
        cached = self._cache.get(policy_id)
        if cached is not None:
            return cached
        async with self.db.session() as session:
            policy = await session.get(Policy, policy_id)
        if policy is None:
            raise NotFound(f"no policy with id {policy_id!r}")
        self._cache[policy_id] = policy
        return policy

    async def create(self, body: PolicyIn, *, actor: str) -> Policy:
        async with self.db.write() as session:
            if await session.scalar(select(Policy.id).where(Policy.name == body.name)):
                raise Conflict(f"a policy named {body.name!r} already exists")
            policy = Policy(id=new_id(), **body.model_dump())
            session.add(policy)
            await self.audit.record(
                session,
                actor=actor,
                action="fleet.policy.create",
                target=policy.id,
                details=body.model_dump(),
            )
        return policy

    async def update(self, policy_id: str, body: PolicyIn, *, actor: str) -> Policy:
        self._cache.pop(policy_id, None)
        async with self.db.write() as session:
            policy = await session.get(Policy, policy_id)
            if policy is None:
                raise NotFound(f"no policy with id {policy_id!r}")
            if policy.builtin:
                raise BadRequest(f"built-in policy {policy.name!r} cannot be changed; copy it")
            clash = await session.scalar(
                select(Policy.id).where(Policy.name == body.name, Policy.id != policy_id)
            )
            if clash:
                raise Conflict(f"a policy named {body.name!r} already exists")
            for key, value in body.model_dump().items():
                setattr(policy, key, value)
            await self.audit.record(
                session,
                actor=actor,
                action="fleet.policy.update",
                target=policy_id,
                details=body.model_dump(),
            )
        return policy

    async def delete(self, policy_id: str, *, actor: str) -> None:
        self._cache.pop(policy_id, None)
        async with self.db.write() as session:
            policy = await session.get(Policy, policy_id)
            if policy is None:
                raise NotFound(f"no policy with id {policy_id!r}")
            if policy.builtin:
                raise BadRequest(f"built-in policy {policy.name!r} cannot be deleted")
            users = await session.scalar(
                select(func.count()).select_from(Probe).where(Probe.policy_id == policy_id)
            )
            if users:
                raise Conflict(f"policy {policy.name!r} is applied to {users} probe(s)")
            await session.delete(policy)
            await self.audit.record(
                session, actor=actor, action="fleet.policy.delete", target=policy_id
            )
