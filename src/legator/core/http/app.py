"""The core application factory: middleware, errors, lifespan and the core routes.

Wings add their routers and start/stop hooks in ``legator.app``; core knows none of them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from legator import __version__
from legator.core.audit.router import router as audit_router
from legator.core.audit.service import RETENTION_ACTOR
from legator.core.auth.oidc_router import router as oidc_router
from legator.core.auth.router import router as auth_router
from legator.core.auth.service import InitialCredentials
from legator.core.db import retention
from legator.core.db.migrate import upgrade
from legator.core.events.router import router as events_router
from legator.core.http.direct import DirectRoutes
from legator.core.http.errors import install_error_handlers
from legator.core.http.middleware import RequestContextMiddleware
from legator.core.http.system_router import router as system_router
from legator.core.logging import get_logger
from legator.core.runtime import Core
from legator.core.version import build_info
from legator.web.pages import router as pages_router

log = get_logger("legator")
CredentialsSink = Callable[[InitialCredentials], None]


def print_initial_credentials(creds: InitialCredentials) -> None:
    """Shown once on the terminal (stderr), never through the logger."""
    banner = (
        "\n"
        "  ┌─ Legator first start ─────────────────────────────────────────────────────\n"
        f"  │ admin user:     {creds.username}\n"
        f"  │ admin password: {creds.password}\n"
        f"  │ admin API key:  {creds.api_key}\n"
        "  │ These are shown once and never again: store them now.\n"
        "  └───────────────────────────────────────────────────────────────────────────\n"
    )
    sys.stderr.write(banner)
    sys.stderr.flush()


def create_core_app(
    core: Core, *, on_first_start: CredentialsSink = print_initial_credentials
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await upgrade(core.db)
        if problem := await core.audit.key_problem():
            # Not fatal: the control plane must not go down with a lost key. But every event
            # from now on fails verification, which an auditor would take for tampering.
            log.error("the audit chain key does not fit the audit log", problem=problem)
        # Cached from here on; it may run git, which the first /version must not do on the loop.
        await asyncio.to_thread(build_info)
        creds = await core.auth.bootstrap_admin()
        if creds is not None:
            on_first_start(creds)
        core.spawn(core.auth.run_housekeeping(), name="auth-housekeeping")
        if days := core.settings.audit_retention_days:
            purge = partial(core.audit.purge_in_batches, actor=RETENTION_ACTOR)
            core.spawn(retention.keep_for("audit events", days, purge), name="audit-retention")
        for hook in core.startup_hooks:
            await hook()
        log.info(
            "legator started",
            addr=core.settings.addr,
            database="sqlite" if core.db.is_sqlite else "postgresql",
            auth=core.settings.auth,
        )
        try:
            yield
        finally:
            for hook in reversed(core.shutdown_hooks):
                try:
                    await hook()
                except Exception:
                    log.exception("shutdown hook failed")
            for task in list(core.background):
                task.cancel()
            await asyncio.gather(*core.background, return_exceptions=True)
            await core.auth.flush_last_used()
            await core.events.close()
            await core.db.dispose()
            log.info("legator stopped")

    app = FastAPI(
        title="Legator",
        version=__version__,
        description="Control plane for AI infrastructure: fleet, gateway and deployments.",
        lifespan=lifespan,
        openapi_url=None,  # served by system_router under /api/v1 with a declared permission
        docs_url=None,
        redoc_url=None,
        # FastAPI's own OpenTelemetry hooks: Legator reports through Prometheus and its logs,
        # and checking for OpenTelemetry providers costs every request a few microseconds.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.core = core
    install_error_handlers(app)
    app.state.direct_routes = {}
    # Added first, so it sits inside the request-context middleware: direct routes still get
    # the request id, security headers, body limit, metrics and access log.
    app.add_middleware(DirectRoutes, routes=app.state.direct_routes)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=core.metrics,
        max_body_bytes=core.settings.max_body_bytes,
        access_log=core.settings.access_log,
    )
    app.include_router(system_router)
    app.include_router(auth_router)
    app.include_router(oidc_router)
    app.include_router(audit_router)
    app.include_router(events_router)
    app.include_router(pages_router)
    app.mount(
        "/static", StaticFiles(directory=Path(__file__).parents[2] / "web" / "static"), "static"
    )
    return app
