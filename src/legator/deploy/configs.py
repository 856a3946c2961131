"""Control-plane side: save, list, get, diff and render per-user configuration versions.

Validating, rendering and diffing cost CPU in proportion to the spec. That work runs in worker
threads (at most :data:`_WORKERS` at once), never on the event loop, so a big configuration
cannot stall other requests; specs are bounded (:data:`legator.deploy.spec.MAX_SERVICES`) and
so are diffs (:data:`MAX_DIFF_LINES`, :data:`MAX_DIFF_WORK`)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from legator.core.audit.service import AuditService
from legator.core.auth.principal import Principal
from legator.core.db import Database
from legator.core.errors import BadRequest, Conflict, NotFound
from legator.deploy.catalog.registry import CATALOG
from legator.deploy.diff import affected_services, changed_files, unified
from legator.deploy.models import DeployConfig
from legator.deploy.render import Rendered, render, service_order
from legator.deploy.schemas import ConfigDiff, ConfigOut
from legator.deploy.spec import DeploySpec, SpecError, ValidSpec, template_of, validate_spec

T = TypeVar("T")

_CACHE_SIZE = 64  # rendered versions (every file): for diffs and the rendered files
_SUMMARY_CACHE_SIZE = 4096  # services and secrets of a version (small): for listings
_SAVE_ATTEMPTS = 3
_WORKERS = 2  # threads validating, rendering or diffing at once (per replica)

LIST_LIMIT = 50
"""Versions ``GET /configs`` returns by default (newest first); ``?limit=`` up to
:data:`LIST_MAX_LIMIT`, ``?before=VERSION`` for the next page."""
LIST_MAX_LIMIT = 100
MAX_DIFF_LINES = 1000
"""A file (or the spec) with more lines than this on either side is not diffed: the diff
says ``Files A and B differ (too large to diff ...)`` instead. difflib is worse than quadratic
on crafted input (measured: 2000 lines can take 1.5 s, 1000 lines stay under 0.2 s). A spec
has ~3-10 lines per service, so this spares the spec diff of only the largest configurations;
their rendered files (two small ones per service) are still diffed one by one."""
MAX_DIFF_WORK = 2_000_000
"""What one diff may compare in all: the sum over files of (lines before + 1) x (lines after
+ 1). Changed files past it are listed as differing, not diffed. Every rendered file of the
largest legal spec fits (~0.15 M); at worst one diff costs ~0.4 s of CPU."""


@dataclass(frozen=True)
class Summary:
    """What a listing shows of a version besides the spec: what rendering it would produce in
    its manifest, computed without rendering."""

    services: list[str]
    secrets_required: list[str]


def summarise(spec: ValidSpec) -> Summary:
    """The manifest's ``services`` and ``secrets_required``, without rendering any file."""
    secrets = {
        need.name
        for key, opts in spec.services.items()
        for need in CATALOG[template_of(key)].secrets(opts)
    }
    return Summary(services=service_order(spec), secrets_required=sorted(secrets))


def _check(spec: DeploySpec) -> Summary:
    return summarise(validate_spec(spec))


def _summarise_stored(specs: list[dict[str, Any]]) -> list[Summary]:
    return [summarise(validate_spec(spec, stored=True)) for spec in specs]


def _lines(data: bytes | None) -> list[str]:
    # Split as ``unified`` does, so the count is the number of lines difflib would compare.
    return [] if data is None else data.decode(errors="replace").splitlines(keepends=True)


def bounded_diffs(
    pairs: list[tuple[dict[str, bytes], dict[str, bytes]]], *, label: tuple[str, str]
) -> list[str]:
    """A unified diff per pair of file sets (as ``unified``), its cost bounded: a changed file
    over :data:`MAX_DIFF_LINES` on either side, or past :data:`MAX_DIFF_WORK` in all, is
    reported as ``Files A and B differ (why)`` (as diff(1) does for binary files), not diffed.
    CPU-bound: run it in a worker thread."""
    budget = MAX_DIFF_WORK
    out: list[str] = []
    for old, new in pairs:
        parts: list[str] = []
        for name in changed_files(old, new):
            before, after = old.get(name), new.get(name)
            a, b = len(_lines(before)), len(_lines(after))
            if max(a, b) > MAX_DIFF_LINES:
                why = f"too large to diff: {a} and {b} lines, the limit is {MAX_DIFF_LINES}"
            elif (a + 1) * (b + 1) > budget:
                why = "not diffed: this diff already compared as much as one diff may"
            else:
                budget -= (a + 1) * (b + 1)
                parts.append(
                    unified(
                        {name: before} if before is not None else {},
                        {name: after} if after is not None else {},
                        label=label,
                    )
                )
                continue
            path_a = f"{label[0]}/{name}" if before is not None else "/dev/null"
            path_b = f"{label[1]}/{name}" if after is not None else "/dev/null"
            parts.append(f"Files {path_a} and {path_b} differ ({why})\n")
        out.append("".join(parts))
    return out


def _spec_file(spec: dict[str, Any]) -> dict[str, bytes]:
    return {"spec.json": json.dumps(spec, indent=2, sort_keys=True).encode()}


def _diff_texts(
    specs: tuple[dict[str, Any], dict[str, Any]],
    files: tuple[dict[str, bytes], dict[str, bytes]],
    label: tuple[str, str],
) -> list[str]:
    return bounded_diffs([(_spec_file(specs[0]), _spec_file(specs[1])), files], label=label)


def _remember(
    cache: OrderedDict[tuple[str, int], T], key: tuple[str, int], value: T, size: int
) -> None:
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > size:
        cache.popitem(last=False)


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
        # Versions never change: keep recent renderings and many summaries by (owner, version).
        # Only touched on the event loop; the worker threads get and return plain values.
        self._rendered: OrderedDict[tuple[str, int], Rendered] = OrderedDict()
        self._summaries: OrderedDict[tuple[str, int], Summary] = OrderedDict()
        self._workers = anyio.CapacityLimiter(_WORKERS)

    async def _work(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound ``fn(*args)`` in a worker thread, off the event loop."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._workers)

    async def save(self, principal: Principal, spec: DeploySpec, comment: str) -> ConfigOut:
        try:
            summary = await self._work(_check, spec)
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
        _remember(self._summaries, (row.owner, row.version), summary, _SUMMARY_CACHE_SIZE)
        return self._out(row, summary)

    async def _insert(
        self, principal: Principal, owner: str, spec: DeploySpec, comment: str
    ) -> DeployConfig:
        # Saves by one owner take turns across all replicas.
        async with self.db.write(turns=f"deploy-config:{owner}") as session:
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

    async def list(
        self, principal: Principal, *, limit: int = LIST_LIMIT, before: int | None = None
    ) -> list[ConfigOut]:
        """Newest first, at most ``limit`` versions, only those below ``before`` if given."""
        query = select(DeployConfig).where(DeployConfig.owner == owner_of(principal))
        if before is not None:
            query = query.where(DeployConfig.version < before)
        query = query.order_by(DeployConfig.version.desc()).limit(limit)
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        summaries = await self._summaries_of(rows)
        return [self._out(row, summary) for row, summary in zip(rows, summaries, strict=True)]

    async def _summaries_of(self, rows: list[DeployConfig]) -> list[Summary]:
        found: dict[tuple[str, int], Summary] = {}
        missing: list[DeployConfig] = []
        for row in rows:
            key = (row.owner, row.version)
            if (hit := self._summaries.get(key)) is not None:
                self._summaries.move_to_end(key)
                found[key] = hit
            elif (rendered := self._rendered.get(key)) is not None:
                manifest = rendered.manifest
                found[key] = Summary(manifest.services, manifest.secrets_required)
            else:
                missing.append(row)
        if missing:
            computed = await self._work(_summarise_stored, [row.spec for row in missing])
            for row, summary in zip(missing, computed, strict=True):
                key = (row.owner, row.version)
                _remember(self._summaries, key, summary, _SUMMARY_CACHE_SIZE)
                found[key] = summary
        return [found[(row.owner, row.version)] for row in rows]

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
        row = await self._row(principal, version)
        (summary,) = await self._summaries_of([row])
        return self._out(row, summary)

    async def rendered(self, principal: Principal, version: str | int) -> Rendered:
        return await self._render(await self._row(principal, version))

    async def diff(self, principal: Principal, a: str | int, b: str | int) -> ConfigDiff:
        old_row, new_row = await self._row(principal, a), await self._row(principal, b)
        old, new = (await self._render(old_row)).files, (await self._render(new_row)).files
        labels = (f"v{old_row.version}", f"v{new_row.version}")
        spec_diff, files_diff = await self._work(
            _diff_texts, (old_row.spec, new_row.spec), (old, new), labels
        )
        changed = changed_files(old, new)
        return ConfigDiff(
            from_version=old_row.version,
            to_version=new_row.version,
            spec_diff=spec_diff,
            files_diff=files_diff,
            changed_files=changed,
            affected_services=affected_services(changed),
        )

    async def _render(self, row: DeployConfig) -> Rendered:
        key = (row.owner, row.version)
        if (hit := self._rendered.get(key)) is not None:
            self._rendered.move_to_end(key)
            return hit
        result = await self._work(self._render_now, row.spec, row.version, row.created_at)
        _remember(self._rendered, key, result, _CACHE_SIZE)
        return result

    def _render_now(self, spec: dict[str, Any], version: int, created_at: datetime) -> Rendered:
        """In a worker thread: validate and render one stored version."""
        with self.render_seconds.time():
            return render(validate_spec(spec, stored=True), version=version, created_at=created_at)

    @staticmethod
    def _out(row: DeployConfig, summary: Summary) -> ConfigOut:
        return ConfigOut(
            version=row.version,
            spec=row.spec,
            comment=row.comment,
            created_by=row.created_by,
            created_at=row.created_at,
            services=summary.services,
            secrets_required=summary.secrets_required,
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
