"""Deploy (Leger): quadlet rendering on the control plane; staging and install on hosts."""

from __future__ import annotations

from fastapi import FastAPI

from legator.core.runtime import Core


def install_deploy(app: FastAPI, core: Core) -> None:
    from legator.deploy.configs import ConfigService
    from legator.deploy.device import DeviceLogins
    from legator.deploy.router import router

    app.state.deploy_configs = ConfigService(core.db, core.audit, core.metrics.registry)
    app.state.deploy_devices = DeviceLogins(core.db, core.audit, core.auth)
    app.include_router(router)
