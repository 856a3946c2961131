"""The shared core every wing receives: settings, database, identity, audit, events, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from legator.core.audit.service import AuditService
from legator.core.auth.service import AuthService
from legator.core.config import Settings
from legator.core.db import Database
from legator.core.events import InMemoryEventBus
from legator.core.metrics import Metrics
from legator.core.security import load_or_create_signing_key

Hook = Callable[[], Awaitable[None]]


@dataclass
class Core:
    settings: Settings
    db: Database
    audit: AuditService
    auth: AuthService
    events: InMemoryEventBus
    metrics: Metrics
    signing_key: bytes
    startup_hooks: list[Hook] = field(default_factory=list)
    shutdown_hooks: list[Hook] = field(default_factory=list)
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Awaitable[None], *, name: str) -> asyncio.Task[None]:
        """Run a background task that lives until shutdown."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


def build_core(settings: Settings) -> Core:
    if settings.data_dir is not None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(settings.effective_database_url)
    chain_key = (
        settings.audit_chain_key.get_secret_value().encode() if settings.audit_chain_key else None
    )
    audit = AuditService(db, chain_key)
    signing = settings.signing_key.get_secret_value() if settings.signing_key else None
    return Core(
        settings=settings,
        db=db,
        audit=audit,
        auth=AuthService(db, audit, session_ttl_hours=settings.session_ttl_hours),
        events=InMemoryEventBus(),
        metrics=Metrics(),
        signing_key=load_or_create_signing_key(signing, settings.data_dir),
    )
