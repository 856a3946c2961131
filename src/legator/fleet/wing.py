"""Wires the fleet wing into the app: services on ``app.state.fleet``, routes, loops."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from fastapi import FastAPI
from starlette.requests import HTTPConnection

from legator.core.db import retention
from legator.core.runtime import Core
from legator.fleet.actions import ProbeActions
from legator.fleet.cluster import FleetCluster
from legator.fleet.commands.service import CommandService, prune_commands
from legator.fleet.gate import Gate
from legator.fleet.guardrails import install_guardrails
from legator.fleet.hub import Hub
from legator.fleet.metrics import FleetMetrics
from legator.fleet.policies import PolicyService
from legator.fleet.registry import ProbeRegistry
from legator.fleet.tokens import TokenService


@dataclass
class Fleet:
    hub: Hub
    tokens: TokenService
    policies: PolicyService
    registry: ProbeRegistry
    commands: CommandService
    actions: ProbeActions
    metrics: FleetMetrics


def build_fleet(core: Core, gate: Gate) -> Fleet:
    settings = core.settings
    metrics = FleetMetrics(core.metrics.registry)
    hub = Hub(core.signing_key)
    if core.cluster is not None:
        hub.cluster = FleetCluster(core.cluster, hub, interval_s=settings.nats_presence_interval_s)
    policies = PolicyService(core.db, core.audit)
    registry = ProbeRegistry(
        core.db,
        core.audit,
        core.events,
        hub,
        metrics,
        offline_after_s=settings.fleet_offline_after_s,
        flush_interval_s=settings.fleet_flush_interval_s,
    )
    commands = CommandService(
        core.db,
        core.audit,
        core.events,
        hub,
        policies,
        metrics,
        gate,
        grace_s=settings.fleet_command_grace_s,
    )
    return Fleet(
        hub=hub,
        tokens=TokenService(core.db, core.audit, settings.fleet_token_ttl_s),
        policies=policies,
        registry=registry,
        commands=commands,
        actions=ProbeActions(core.db, core.audit, hub, registry, policies, commands),
        metrics=metrics,
    )


def fleet_of(conn: HTTPConnection) -> Fleet:
    return conn.app.state.fleet  # type: ignore[no-any-return]


def install_fleet(app: FastAPI, core: Core) -> Fleet:
    from legator.fleet.installer import router as installer_router
    from legator.fleet.router import router
    from legator.fleet.socket import router as socket_router

    # The approval queue and the gate come first: every command passes through them.
    gate = install_guardrails(app, core)
    fleet = build_fleet(core, gate)
    app.state.fleet = fleet

    async def start() -> None:
        await fleet.policies.seed()
        await fleet.registry.sweep()
        core.spawn(fleet.registry.run_liveness(), name="fleet-liveness")
        core.spawn(fleet.commands.run_reaper(), name="fleet-lost-commands")
        if days := core.settings.fleet_command_retention_days:
            core.spawn(
                retention.keep_for("commands", days, partial(prune_commands, core.db)),
                name="fleet-command-retention",
            )
        if fleet.hub.cluster is not None:
            await fleet.hub.cluster.start()
            core.spawn(fleet.hub.cluster.run(), name="fleet-cluster-presence")
            core.spawn(fleet.commands.follow_finishes(), name="fleet-finished-elsewhere")

    async def stop() -> None:
        await fleet.hub.close_all()
        await fleet.registry.flush()
        await fleet.commands.close()

    core.startup_hooks.append(start)
    core.shutdown_hooks.append(stop)
    app.include_router(router)
    app.include_router(socket_router)
    app.include_router(installer_router)
    return fleet
