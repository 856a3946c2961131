"""Wires the brain into the app: the service on ``app.state.brain``, its routes, and the
deletion of idle chat sessions (``brain_session_retention_days``)."""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI

from legator.brain.router import router, ws_router
from legator.brain.service import BrainService, prune_sessions
from legator.core.db import retention
from legator.core.runtime import Core


def install_brain(app: FastAPI, core: Core) -> BrainService:
    brain = BrainService(core, app.state)
    app.state.brain = brain

    async def start() -> None:
        if days := core.settings.brain_session_retention_days:
            core.spawn(
                retention.keep_for("chat sessions", days, partial(prune_sessions, core.db)),
                name="brain-session-retention",
            )

    core.startup_hooks.append(start)
    app.include_router(router)
    app.include_router(ws_router)
    return brain
