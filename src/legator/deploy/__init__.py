"""Deploy (Leger): quadlet rendering on the control plane; staging and install on hosts."""

from __future__ import annotations

from fastapi import FastAPI

from legator.core.runtime import Core


def install_deploy(app: FastAPI, core: Core) -> None:
    from legator.core.auth.tailscale import WhoIs
    from legator.deploy.configs import ConfigService
    from legator.deploy.device import DeviceLogins
    from legator.deploy.router import router
    from legator.deploy.tailscale_login import TailscaleLogins

    app.state.deploy_configs = ConfigService(core.db, core.audit, core.metrics.registry)
    app.state.deploy_devices = DeviceLogins(core.db, core.audit, core.auth)
    socket = core.settings.tailscale_socket
    whois = WhoIs(socket) if socket is not None else None
    app.state.deploy_tailscale = TailscaleLogins(core.auth, core.audit, whois)
    if whois is not None:
        core.shutdown_hooks.append(whois.aclose)
    app.include_router(router)
