"""Wires the brain into the app: the service on ``app.state.brain`` and its routes."""

from __future__ import annotations

from fastapi import FastAPI

from legator.brain.router import router, ws_router
from legator.brain.service import BrainService
from legator.core.runtime import Core


def install_brain(app: FastAPI, core: Core) -> BrainService:
    brain = BrainService(core, app.state)
    app.state.brain = brain
    app.include_router(router)
    app.include_router(ws_router)
    return brain
