"""The MCP server at ``/mcp`` (streamable HTTP, the official ``mcp`` SDK).

The route authenticates like every other route (an API key, ``fleet:read`` to connect); each
tool then checks the caller's own permission, so an MCP client can do exactly what the same
key can do over REST. ``run_command`` goes through the fleet's gate like everything else."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request, Response
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field
from starlette.types import ASGIApp, Receive, Scope, Send

from legator.core.audit.service import AuditFilter
from legator.core.auth.permissions import Permission as P
from legator.core.auth.principal import Principal
from legator.core.errors import AppError
from legator.core.http.deps import require
from legator.core.runtime import Core
from legator.fleet.approvals.schemas import ApprovalStatus
from legator.fleet.gate import MODEL_ORIGINS
from legator.fleet.schemas import CommandRequest

MCP_PATH = "/mcp"
MAX_APPROVAL_WAIT_S = 600


class ToolDenied(ToolError):
    """Shown to the MCP client as the tool's error text."""


def _principal(ctx: Context, permission: P) -> Principal:
    # The route's ``require`` left the authenticated principal on the shared ASGI scope.
    principal: Principal = ctx.request_context.request.state.principal
    if not principal.can(permission):
        raise ToolDenied(f"this key lacks the permission {permission.value}")
    return principal


def _command_view(row: Any) -> dict[str, Any]:
    return {
        "request_id": row.id,
        "probe_id": row.probe_id,
        "status": row.status,
        "exit_code": row.exit_code,
        "stdout": row.stdout,
        "stderr": row.stderr,
        "truncated": row.truncated,
        "error": row.error,
    }


async def _call(coro: Any) -> Any:
    try:
        return await coro
    except AppError as exc:
        detail = f" ({json.dumps(exc.details, default=str)})" if exc.details else ""
        raise ToolDenied(exc.message + detail) from None


def build_server(core: Core, state: Any) -> MCPServer:
    def _caller(ctx: Context, permission: P) -> tuple[Principal, Any]:
        return _principal(ctx, permission), state

    server: MCPServer = MCPServer(
        "legator",
        instructions="Legator's fleet: probes, commands through the policy gate, approvals.",
    )

    @server.tool()
    async def list_probes(ctx: Context, tag: str | None = None) -> list[dict[str, Any]]:
        """List probes (id, hostname, status, tags), optionally only those with a tag."""
        _, state = _caller(ctx, P.FLEET_READ)
        probes = await state.fleet.registry.list(tag=tag)
        return [p.model_dump(mode="json") for p in probes]

    @server.tool()
    async def probe_info(ctx: Context, probe_id: str) -> dict[str, Any]:
        """A probe's details, inventory and health score."""
        _, state = _caller(ctx, P.FLEET_READ)
        detail = await _call(state.fleet.registry.detail(probe_id))
        health = await _call(state.fleet.registry.health(probe_id))
        return {**detail.model_dump(mode="json"), "health": health.model_dump(mode="json")}

    @server.tool()
    async def run_command(
        ctx: Context,
        probe_id: str,
        command: str,
        args: list[str] | None = None,
        shell: bool = False,
        reason: str = "",
        wait_for_approval_s: Annotated[int, Field(ge=0, le=MAX_APPROVAL_WAIT_S)] = 0,
    ) -> dict[str, Any]:
        """Run a command on a probe through the policy gate: the result when allowed, an
        error when refused. When a human must decide, wait up to ``wait_for_approval_s``
        seconds for the decision (and the result, if approved); still undecided, the answer
        is the pending approval (id, rationale), whose result ``get_command`` reads later."""
        principal, state = _caller(ctx, P.FLEET_COMMAND)
        commands = state.fleet.commands
        request = CommandRequest(command=command, args=args or [], shell=shell)
        verdict, row = await _call(
            commands.run(
                principal=principal,
                probe_id=probe_id,
                request=request,
                mode="wait",
                origin="mcp",
                reason=reason[:500],
            )
        )
        if row is not None:
            return _command_view(row)
        approval = verdict.approval
        pending = {"status": "pending_approval", "approval_id": approval.id}
        decided = await commands.gate.approvals.wait(approval.id, wait_for_approval_s)
        if decided.status in (ApprovalStatus.PENDING, ApprovalStatus.APPROVED):
            return {**pending, "rationale": verdict.rationale}
        reasons = [d.reason for d in decided.decisions if d.reason]
        if decided.status != ApprovalStatus.DISPATCHED:
            return {**pending, "status": decided.status, "reasons": reasons}
        row, error = await commands.approved_result(decided, probe_id, request.timeout_s + 30)
        if row is None:
            return {**pending, "status": "error", "reasons": reasons, "error": error}
        return {**_command_view(row), "approval_id": approval.id}

    @server.tool()
    async def get_command(ctx: Context, request_id: str) -> dict[str, Any]:
        """A command's status and result by its request id (e.g. one an approval ran)."""
        _, state = _caller(ctx, P.FLEET_READ)
        return _command_view(await _call(state.fleet.commands.get(request_id)))

    @server.tool()
    async def read_file(ctx: Context, probe_id: str, path: str) -> str:
        """Read a file on a probe (within the paths its policy allows)."""
        principal, state = _caller(ctx, P.FLEET_COMMAND)
        data = await _call(
            state.fleet.actions.file_op(
                probe_id, {"op": "read", "path": path}, actor=principal.actor
            )
        )
        return data if isinstance(data, str) else json.dumps(data, default=str)

    @server.tool()
    async def fleet_summary(ctx: Context) -> dict[str, Any]:
        """Probes by status, connections, tags, commands in flight and approvals waiting."""
        _, state = _caller(ctx, P.FLEET_READ)
        summary = await state.fleet.registry.summary()
        summary.approvals_pending = await state.approvals.count_pending()
        return summary.model_dump(mode="json")  # type: ignore[no-any-return]

    @server.tool()
    async def list_approvals(ctx: Context, status: str | None = "pending") -> list[dict[str, Any]]:
        """Approvals, newest first (status: pending, approved, dispatched, denied, …)."""
        _, state = _caller(ctx, P.FLEET_READ)
        try:
            wanted = ApprovalStatus(status) if status else None
        except ValueError:
            raise ToolDenied(f"unknown status {status!r}") from None
        return [a.model_dump(mode="json") for a in await state.approvals.list(wanted)]

    @server.tool()
    async def decide_approval(
        ctx: Context, approval_id: str, decision: str, reason: str = ""
    ) -> dict[str, Any]:
        """Approve or deny a pending approval as the calling key's user."""
        principal, state = _caller(ctx, P.APPROVALS_DECIDE)
        if decision not in ("approve", "deny"):
            raise ToolDenied("decision must be 'approve' or 'deny'")
        if decision == "approve":
            pending = await _call(state.approvals.get(approval_id))
            if pending.requester == principal.actor:
                # An agent that asked for an action must not be the one to wave it through:
                # a person approves it, in the web UI, the CLI or the API.
                raise ToolDenied(
                    "an MCP client cannot approve a request its own user made; "
                    "a person decides it in the web UI, the CLI or the API"
                )
            origin = pending.rationale.get("origin")
            if origin in MODEL_ORIGINS:
                # Nor may another agent (another user's key): two agents would approve each
                # other's actions, and no person would have seen them.
                raise ToolDenied(
                    f"an MCP client cannot approve a request a model wrote (origin {origin}); "
                    "a person decides it in the web UI, the CLI or the API"
                )
        out = await _call(state.approvals.decide(approval_id, principal, decision, reason))
        return out.model_dump(mode="json")  # type: ignore[no-any-return]

    @server.tool()
    async def query_audit(
        ctx: Context, action: str | None = None, target: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Audit events, newest first (action may be a prefix ending in '*')."""
        _caller(ctx, P.AUDIT_READ)
        events, _ = await core.audit.query(
            AuditFilter(action=action, target=target), limit=max(1, min(limit, 500))
        )
        return [event.model_dump(mode="json") for event in events]

    @server.resource("legator://probes/{probe_id}", mime_type="application/json")
    async def probe_resource(probe_id: str, ctx: Context) -> str:
        """A probe: hostname, status, tags, metrics."""
        _, state = _caller(ctx, P.FLEET_READ)
        detail = await _call(state.fleet.registry.detail(probe_id))
        return json.dumps(detail.model_dump(mode="json", exclude={"inventory"}))

    @server.resource("legator://probes/{probe_id}/inventory", mime_type="application/json")
    async def inventory_resource(probe_id: str, ctx: Context) -> str:
        """A probe's inventory (OS, kernel, CPUs, memory, disks, services)."""
        _, state = _caller(ctx, P.FLEET_READ)
        detail = await _call(state.fleet.registry.detail(probe_id))
        return json.dumps(detail.inventory, default=str)

    return server


class _Delegate(Response):
    """Hands the (already authenticated) request to the MCP transport's ASGI app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def install_mcp(app: FastAPI, core: Core) -> MCPServer:
    server = build_server(core, app.state)
    transport = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        json_response=True,
        # API keys, not cookies, authenticate here, so DNS rebinding gains an attacker nothing;
        # the Host check would refuse every reverse-proxied name.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    router = APIRouter(tags=["mcp"])

    @router.api_route(MCP_PATH, methods=["GET", "POST", "DELETE"], include_in_schema=False)
    async def mcp_endpoint(request: Request, _: Principal = require(P.FLEET_READ)) -> Response:
        return _Delegate(transport)

    app.include_router(router)
    stack = AsyncExitStack()

    async def start() -> None:
        await stack.enter_async_context(server.session_manager.run())

    async def stop() -> None:
        await stack.aclose()

    core.startup_hooks.append(start)
    core.shutdown_hooks.append(stop)
    return server
