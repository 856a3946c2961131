"""Fleet REST API: tokens, registration, probes, commands, policies, fleet views."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.errors import BadRequest, NotFound
from legator.core.http.deps import core_of, require
from legator.fleet.protocol import OutputChunk
from legator.fleet.schemas import (
    CleanupResult,
    ClusterStatus,
    CommandOut,
    CommandRequest,
    Dispatched,
    FanOutResult,
    Health,
    PendingApproval,
    PolicyIn,
    PolicyOut,
    ProbeActionResult,
    ProbeDetail,
    ProbeOut,
    Registered,
    RegisterRequest,
    Summary,
    TagsUpdate,
    TokenCreated,
    TokenOut,
    UpdateRequest,
)
from legator.fleet.wing import fleet_of

router = APIRouter(prefix="/api/v1", tags=["fleet"])
P = Permission
_DURATION = re.compile(r"^(\d+)([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_older_than(value: str) -> timedelta:
    match = _DURATION.match(value.strip())
    if not match:
        raise BadRequest(f"older_than {value!r} must look like 90s, 30m, 24h, 7d or 2w")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def server_url(request: Request) -> str:
    configured = core_of(request).settings.server_url
    if configured:
        return configured
    proto = request.headers.get("x-forwarded-proto") or request.url.scheme
    host = request.headers.get("x-forwarded-host") or request.headers.get("host", "localhost")
    return f"{proto}://{host}"


# ---- enrolment ------------------------------------------------------------------------


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated)
async def create_token(
    request: Request,
    multi_use: bool = False,
    no_expiry: bool = False,
    probe_id: Annotated[
        str | None,
        Query(
            max_length=32,
            description="Make a re-enrolment token: it enrols this probe again (a new key, "
            "same id, policy and history) and nothing else. Single-use and expiring.",
        ),
    ] = None,
    principal: Principal = require(P.FLEET_ADMIN),
) -> TokenCreated:
    """Create an enrolment token (shown once). Single-use and 30-minute by default. A token
    enrols new hostnames only; an enrolled one takes a re-enrolment token (``probe_id``)."""
    row, raw = await fleet_of(request).tokens.create(
        actor=principal.actor, multi_use=multi_use, no_expiry=no_expiry, probe_id=probe_id
    )
    base = server_url(request)
    return TokenCreated(
        id=row.id,
        token=raw,
        expires_at=row.expires_at,
        multi_use=row.multi_use,
        probe_id=row.probe_id,
        # The token goes through the environment, never an argument: arguments show in
        # `ps` to every user of the host (`sudo VAR=value` would put it in sudo's).
        install_command=f"export LEGATOR_TOKEN={raw}; curl -fsSL {base}/install.sh | "
        f"sudo --preserve-env=LEGATOR_TOKEN sh -s -- --server {base}",
    )


@router.get("/tokens", response_model=list[TokenOut], dependencies=[require(P.FLEET_ADMIN)])
async def list_tokens(request: Request) -> list[Any]:
    return await fleet_of(request).tokens.list()


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_token(
    token_id: str, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> None:
    await fleet_of(request).tokens.delete(token_id, actor=principal.actor)


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=Registered,
    dependencies=[require(P.PUBLIC)],
)
async def register(body: RegisterRequest, request: Request) -> Registered:
    """Enrol a probe with a token. Public: the token is the credential."""
    fleet = fleet_of(request)
    probe, api_key = await fleet.registry.register(body)
    return Registered(
        probe_id=probe.id,
        api_key=api_key,
        policy_id=probe.policy_id,
        signing_key=fleet.hub.key_for(probe.id, probe.key_salt),  # this enrolment's
    )


# ---- probes -------------------------------------------------------------------------


@router.get("/probes", response_model=list[ProbeOut], dependencies=[require(P.FLEET_READ)])
async def list_probes(
    request: Request,
    status_filter: Annotated[
        Literal["online", "degraded", "offline"] | None, Query(alias="status")
    ] = None,
    tag: str | None = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
) -> list[ProbeOut]:
    return await fleet_of(request).registry.list(status=status_filter, tag=tag, q=q)


@router.get("/probes/{probe_id}", response_model=ProbeDetail, dependencies=[require(P.FLEET_READ)])
async def get_probe(probe_id: str, request: Request) -> ProbeDetail:
    return await fleet_of(request).registry.detail(probe_id)


@router.get(
    "/probes/{probe_id}/health", response_model=Health, dependencies=[require(P.FLEET_READ)]
)
async def probe_health(probe_id: str, request: Request) -> Health:
    return await fleet_of(request).registry.health(probe_id)


@router.delete("/probes/{probe_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_probe(
    probe_id: str, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> None:
    await fleet_of(request).registry.delete(probe_id, actor=principal.actor)


@router.put("/probes/{probe_id}/tags", response_model=ProbeOut)
async def put_tags(
    probe_id: str, body: TagsUpdate, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> ProbeOut:
    return await fleet_of(request).registry.set_tags(probe_id, body.tags, actor=principal.actor)


@router.post(
    "/probes/{probe_id}/command",
    response_model=CommandOut | Dispatched | PendingApproval,
    responses={202: {"model": PendingApproval, "description": "Waiting for approval."}},
)
async def run_command(
    probe_id: str,
    body: CommandRequest,
    request: Request,
    response: Response,
    wait: bool = False,
    stream: bool = False,
    principal: Principal = require(P.FLEET_COMMAND),
) -> CommandOut | Dispatched | PendingApproval:
    """Run a command: fire-and-forget (default), ``?wait=true`` for the result, or
    ``?stream=true`` for output at ``/api/v1/commands/{request_id}/stream``. Every command
    passes the gate: a risky one answers 202 with the approval it waits for. The decision is
    in the headers ``X-Legator-Policy-Decision`` and ``X-Legator-Risk-Tier``."""
    if wait and stream:
        raise BadRequest("choose one of wait=true or stream=true")
    mode = "wait" if wait else "stream" if stream else "dispatch"
    verdict, row = await fleet_of(request).commands.run(
        principal=principal, probe_id=probe_id, request=body, mode=mode
    )
    response.headers.update(verdict.headers)
    if row is None:
        assert verdict.approval is not None
        response.status_code = 202
        return PendingApproval(approval_id=verdict.approval.id, rationale=verdict.rationale)
    if mode == "wait":
        return CommandOut.model_validate(row, from_attributes=True)
    url = f"/api/v1/commands/{row.id}/stream" if stream else None
    return Dispatched(request_id=row.id, stream_url=url)


@router.post("/probes/{probe_id}/apply-policy/{policy_id}", response_model=ProbeActionResult)
async def apply_policy(
    probe_id: str, policy_id: str, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> ProbeActionResult:
    return await fleet_of(request).actions.apply_policy(probe_id, policy_id, actor=principal.actor)


@router.post("/probes/{probe_id}/rotate-key", response_model=ProbeActionResult)
async def rotate_key(
    probe_id: str, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> ProbeActionResult:
    """Hand the probe a new key over the signed channel; the old one dies once it acks."""
    return await fleet_of(request).actions.rotate_key(probe_id, actor=principal.actor)


@router.post("/probes/{probe_id}/update", response_model=ProbeActionResult)
async def update_probe(
    probe_id: str,
    body: UpdateRequest,
    request: Request,
    principal: Principal = require(P.FLEET_ADMIN),
) -> ProbeActionResult:
    return await fleet_of(request).actions.update(probe_id, body, actor=principal.actor)


@router.get("/probes/{probe_id}/files")
async def probe_files(
    probe_id: str,
    request: Request,
    op: Literal["read", "readlines", "search", "stat"],
    path: Annotated[str, Query(min_length=1, max_length=4096)],
    start: Annotated[int, Query(ge=1)] = 1,
    end: Annotated[int | None, Query(ge=1)] = None,
    pattern: Annotated[str | None, Query(max_length=1000)] = None,
    principal: Principal = require(P.FLEET_COMMAND),
) -> dict[str, Any]:
    """Read-only file operations, limited to the probe policy's paths."""
    if op == "search" and not pattern:
        raise BadRequest("op=search needs a pattern")
    data = await fleet_of(request).actions.file_op(
        probe_id,
        {"op": op, "path": path, "start": start, "end": end, "pattern": pattern},
        actor=principal.actor,
    )
    return {"probe_id": probe_id, "op": op, "path": path, "result": data}


# ---- commands -----------------------------------------------------------------------


@router.get(
    "/commands/pending", response_model=list[CommandOut], dependencies=[require(P.FLEET_READ)]
)
async def pending_commands(request: Request) -> list[Any]:
    return await fleet_of(request).commands.pending()


@router.get(
    "/commands/{request_id}", response_model=CommandOut, dependencies=[require(P.FLEET_READ)]
)
async def get_command(request_id: str, request: Request) -> Any:
    return await fleet_of(request).commands.get(request_id)


@router.get("/commands/{request_id}/stream", dependencies=[require(P.FLEET_READ)])
async def stream_command(
    request_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events: ``stdout``/``stderr`` chunks (id = sequence number, resumable
    with ``Last-Event-ID``), then one ``result`` event with the final command."""
    after = -1
    if last_event_id:
        if not last_event_id.isdigit():
            raise BadRequest("Last-Event-ID must be a chunk sequence number")
        after = int(last_event_id)
    commands = fleet_of(request).commands
    await commands.get(request_id)

    async def events() -> AsyncIterator[str]:
        async for item in commands.stream(request_id, after):
            if item is None:
                yield ": keep-alive\n\n"
            elif isinstance(item, OutputChunk):
                data = json.dumps({"seq": item.seq, "stream": item.stream, "data": item.data})
                yield f"id: {item.seq}\nevent: {item.stream}\ndata: {data}\n\n"
            else:
                out = CommandOut.model_validate(item, from_attributes=True)
                yield f"event: result\ndata: {out.model_dump_json()}\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


# ---- policies -----------------------------------------------------------------------


@router.get("/policies", response_model=list[PolicyOut], dependencies=[require(P.FLEET_READ)])
async def list_policies(request: Request) -> list[Any]:
    return await fleet_of(request).policies.list()


@router.get("/policies/{policy_id}", response_model=PolicyOut, dependencies=[require(P.FLEET_READ)])
async def get_policy(policy_id: str, request: Request) -> Any:
    return await fleet_of(request).policies.get(policy_id)


@router.post("/policies", response_model=PolicyOut, status_code=status.HTTP_201_CREATED)
async def create_policy(
    body: PolicyIn, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> Any:
    return await fleet_of(request).policies.create(body, actor=principal.actor)


@router.put("/policies/{policy_id}", response_model=PolicyOut)
async def update_policy(
    policy_id: str, body: PolicyIn, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> Any:
    return await fleet_of(request).policies.update(policy_id, body, actor=principal.actor)


@router.delete("/policies/{policy_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_policy(
    policy_id: str, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> None:
    await fleet_of(request).policies.delete(policy_id, actor=principal.actor)


# ---- fleet views --------------------------------------------------------------------


@router.get("/fleet/summary", response_model=Summary, dependencies=[require(P.FLEET_READ)])
async def fleet_summary(request: Request) -> Summary:
    """Probes by status, connections, tags, commands in flight and approvals waiting."""
    summary = await fleet_of(request).registry.summary()
    summary.approvals_pending = await request.app.state.approvals.count_pending()
    return summary


@router.get("/fleet/cluster", response_model=ClusterStatus, dependencies=[require(P.FLEET_READ)])
async def fleet_cluster(request: Request) -> ClusterStatus:
    """This replica, its link to NATS and the other replicas it hears from."""
    return fleet_of(request).hub.cluster_status()


@router.get("/fleet/inventory", dependencies=[require(P.FLEET_READ)])
async def fleet_inventory(request: Request) -> list[dict[str, Any]]:
    return await fleet_of(request).registry.inventory()


@router.get("/fleet/tags", dependencies=[require(P.FLEET_READ)])
async def fleet_tags(request: Request) -> dict[str, int]:
    return (await fleet_of(request).registry.summary()).tags


@router.get(
    "/fleet/by-tag/{tag}", response_model=list[ProbeOut], dependencies=[require(P.FLEET_READ)]
)
async def fleet_by_tag(tag: str, request: Request) -> list[ProbeOut]:
    return await fleet_of(request).registry.list(tag=tag)


@router.post("/fleet/by-tag/{tag}/command", response_model=FanOutResult)
async def fleet_by_tag_command(
    tag: str,
    body: CommandRequest,
    request: Request,
    response: Response,
    principal: Principal = require(P.FLEET_COMMAND),
) -> FanOutResult:
    """Run on every probe with ``tag``: one gate decision for the group (202 with one
    approval listing every target when it must wait), results per probe (a target whose
    policy refuses the command is reported with the reason)."""
    fleet = fleet_of(request)
    probes = await fleet.registry.rows(tag=tag)
    if not probes:
        raise NotFound(f"no probe has the tag {tag!r}")
    verdict, outcome = await fleet.commands.fan_out(
        principal=principal, tag=tag, request=body, probes=probes
    )
    response.headers.update(verdict.headers)
    if verdict.decision == "queue":
        response.status_code = 202
    return outcome


@router.post("/fleet/cleanup", response_model=CleanupResult)
async def fleet_cleanup(
    request: Request,
    older_than: str = "7d",
    principal: Principal = require(P.FLEET_ADMIN),
) -> CleanupResult:
    """Delete probes that have been offline for longer than ``older_than``."""
    removed = await fleet_of(request).registry.cleanup(
        parse_older_than(older_than), actor=principal.actor
    )
    return CleanupResult(removed=removed)
