"""The shared core every wing receives: settings, database, identity, audit, events, metrics."""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from legator.core.audit.service import AuditService
from legator.core.auth.oidc_provider import OidcProvider
from legator.core.auth.oidc_service import OidcLogins
from legator.core.auth.service import AuthService
from legator.core.cluster import ClusterLink
from legator.core.config import Settings
from legator.core.db import Database
from legator.core.events import InMemoryEventBus
from legator.core.events.cluster import ClusterEventBus
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
    cluster: ClusterLink | None = None  # set when several replicas share NATS
    oidc: OidcLogins | None = None  # set when single sign-on is configured
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
    signing_key = load_or_create_signing_key(signing, settings.data_dir)
    metrics = Metrics()
    cluster = None
    events = InMemoryEventBus()
    if settings.nats_url is not None:
        cluster = ClusterLink(
            settings.nats_url.get_secret_value(),
            prefix=settings.nats_subject_prefix,
            replica_id=settings.replica_id or default_replica_id(),
            master_key=signing_key,
            registry=metrics.registry,
        )
        events = ClusterEventBus(cluster)
    core = Core(
        settings=settings,
        db=db,
        audit=audit,
        auth=AuthService(
            db,
            audit,
            session_ttl_hours=settings.session_ttl_hours,
            cluster=cluster,
            signing_key=signing_key,
        ),
        events=events,
        metrics=metrics,
        signing_key=signing_key,
        cluster=cluster,
    )
    if settings.oidc_enabled:
        provider = OidcProvider(settings)
        core.oidc = OidcLogins(
            provider,
            core.auth,
            default_role=settings.oidc_default_role,
            create_users=settings.oidc_create_users,
        )
        core.shutdown_hooks.append(provider.aclose)
    if cluster is not None:
        # First to start and, hooks running in reverse at shutdown, last to stop.
        core.startup_hooks.append(cluster.start)
        core.shutdown_hooks.append(cluster.close)
    return core


def default_replica_id() -> str:
    """The host name (as a subject token) and a random suffix: unique even when replicas
    share a host name, as containers started from one image often do."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:48].strip("-") or "replica"
    return f"{host}-{secrets.token_hex(3)}"
