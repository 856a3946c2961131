"""Control-plane side: save, list, get, diff and render per-user configuration versions."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from legator.core.audit.service import AuditService
from legator.core.auth.principal import Principal
from legator.core.db import Database
from legator.core.errors import BadRequest, Conflict, NotFound
from legator.deploy.catalog.registry import CATALOG
from legator.deploy.diff import affected_services, changed_files, unified
from legator.deploy.models import DeployConfig
from legator.deploy.render import Rendered, render
from legator.deploy.schemas import ConfigDiff, ConfigOut
from legator.deploy.spec import DeploySpec, SpecError, validate_spec

_CACHE_SIZE = 64
_SAVE_ATTEMPTS = 3


def owner_of(principal: Principal) -> str:
    return principal.user_id or principal.username


class ConfigService:
    def __init__(
        self, db: Database, audit: AuditService, registry: CollectorRegistry | None = None
    ) -> None:
        self.db = db
        self.audit = audit
        self.saved = Counter(
            "legator_deploy_configs_saved",
            "Deploy configuration versions saved.",
            registry=registry,
        )
        self.render_seconds = Histogram(
            "legator_deploy_render_seconds",
            "Time to render a configuration version into quadlets.",
            registry=registry,
        )
        # Rendering is deterministic per (owner, version); keep recent ones hot.
        self._rendered: OrderedDict[tuple[str, int], Rendered] = OrderedDict()

    async def save(self, principal: Principal, spec: DeploySpec, comment: str) -> ConfigOut:
        try:
            validate_spec(spec)
        except SpecError as exc:
            raise BadRequest(f"invalid configuration: {exc}", details=exc.errors) from None
        owner = owner_of(principal)
        for attempt in range(_SAVE_ATTEMPTS):
            try:
                row = await self._insert(principal, owner, spec, comment)
                break
            except IntegrityError:
                # Two saves raced for the same next version number (unique per owner).
                if attempt == _SAVE_ATTEMPTS - 1:
                    raise Conflict("another save is in progress; try again") from None
        self.saved.inc()
        return self._out(row)

    async def _insert(
        self, principal: Principal, owner: str, spec: DeploySpec, comment: str
    ) -> DeployConfig:
        async with self.db.write() as session:
            if session.bind.dialect.name == "postgresql":
                # Saves by one owner take turns across all replicas (SQLite's BEGIN IMMEDIATE
                # already serialises writers); released when the transaction ends.
                await session.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                    {"key": f"deploy-config:{owner}"},
                )
            latest = await session.scalar(
                select(func.max(DeployConfig.version)).where(DeployConfig.owner == owner)
            )
            row = DeployConfig(
                owner=owner,
                version=(latest or 0) + 1,
                spec=spec.model_dump(mode="json"),
                comment=comment,
                created_by=principal.actor,
            )
            session.add(row)
            await session.flush()
            await self.audit.record(
                session,
                actor=principal.actor,
                action="deploy.config.save",
                target=f"deploy-config:{owner}:{row.version}",
                details={"services": sorted(spec.services)},
            )
        return row

    async def list(self, principal: Principal) -> list[ConfigOut]:
        async with self.db.session() as session:
            rows = await session.scalars(
                select(DeployConfig)
                .where(DeployConfig.owner == owner_of(principal))
                .order_by(DeployConfig.version.desc())
            )
            return [self._out(row) for row in rows]

    async def _row(self, principal: Principal, version: str | int) -> DeployConfig:
        owner = owner_of(principal)
        query = select(DeployConfig).where(DeployConfig.owner == owner)
        if version == "latest":
            query = query.order_by(DeployConfig.version.desc()).limit(1)
        else:
            try:
                number = int(version)
            except ValueError:
                raise BadRequest(f"version must be a number or 'latest', got {version!r}") from None
            query = query.where(DeployConfig.version == number)
        async with self.db.session() as session:
            row = await session.scalar(query)
        if row is None:
            what = "no configuration saved yet" if version == "latest" else f"no version {version}"
            raise NotFound(f"deploy configuration: {what}")
        return row

    async def get(self, principal: Principal, version: str | int) -> ConfigOut:
        return self._out(await self._row(principal, version))

    async def rendered(self, principal: Principal, version: str | int) -> Rendered:
        return self._render(await self._row(principal, version))

    async def diff(self, principal: Principal, a: str | int, b: str | int) -> ConfigDiff:
        old_row, new_row = await self._row(principal, a), await self._row(principal, b)
        old, new = self._render(old_row).files, self._render(new_row).files
        changed = changed_files(old, new)
        spec_old = json.dumps(old_row.spec, indent=2, sort_keys=True).encode()
        spec_new = json.dumps(new_row.spec, indent=2, sort_keys=True).encode()
        labels = (f"v{old_row.version}", f"v{new_row.version}")
        return ConfigDiff(
            from_version=old_row.version,
            to_version=new_row.version,
            spec_diff=unified({"spec.json": spec_old}, {"spec.json": spec_new}, label=labels),
            files_diff=unified(old, new, label=labels),
            changed_files=changed,
            affected_services=affected_services(changed),
        )

    def _render(self, row: DeployConfig) -> Rendered:
        key = (row.owner, row.version)
        if (hit := self._rendered.get(key)) is not None:
            self._rendered.move_to_end(key)
            return hit
        with self.render_seconds.time():
            result = render(validate_spec(row.spec), version=row.version, created_at=row.created_at)
        self._rendered[key] = result
        if len(self._rendered) > _CACHE_SIZE:
            self._rendered.popitem(last=False)
        return result

    def _out(self, row: DeployConfig) -> ConfigOut:
        manifest = self._render(row).manifest
        return ConfigOut(
            version=row.version,
            spec=row.spec,
            comment=row.comment,
            created_by=row.created_by,
            created_at=row.created_at,
            services=manifest.services,
            secrets_required=manifest.secrets_required,
        )


def catalog_entries() -> list[dict[str, Any]]:
    entries = []
    for template in CATALOG.values():
        defaults = template.options()
        entries.append(
            {
                "name": template.name,
                "title": template.title,
                "description": template.description,
                "container_port": template.container_port,
                "options_schema": template.schema(),
                "default_requires": template.requires(defaults),
                "default_secrets": [vars(need) for need in template.secrets(defaults)],
            }
        )
    return entries
