"""``/api/v1/gateway/…``: catalogue, backends, settings, keys, usage, reservations, live metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import PlainTextResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.errors import BadRequest, Conflict
from legator.core.http.deps import core_of, require
from legator.core.http.live import pause, still_allowed, stream_place
from legator.core.security import mask_url
from legator.gateway import system
from legator.gateway.gguf import Estimate, GGUFInfo, estimate
from legator.gateway.hub import client as hub
from legator.gateway.hub.downloads import DownloadOut, DownloadRequest
from legator.gateway.keys import InferenceKeys
from legator.gateway.openai_api import gateway_of
from legator.gateway.reservations import TRANSITIONS
from legator.gateway.schemas import (
    CategoryIn,
    CategoryOut,
    CategoryUpdate,
    EstimateRequest,
    InferenceKeyCreate,
    InferenceKeyCreated,
    InferenceKeyOut,
    ModelCreate,
    ModelOut,
    ModelPublicOut,
    ModelUpdate,
    ReservationCreate,
    ReservationOut,
    SchedulerSettings,
    SchedulerSettingsUpdate,
    UsageReport,
)
from legator.gateway.supervisor import BackendStatus
from legator.gateway.usage import Period, Window, report, window

router = APIRouter(prefix="/api/v1/gateway", tags=["gateway"])
P = Permission
READ = require(P.GATEWAY_READ)
ADMIN = require(P.GATEWAY_ADMIN)
LIVE_INTERVAL_S = 2.0


def _keys(request: Request) -> InferenceKeys:
    gateway = gateway_of(request)
    return InferenceKeys(core_of(request).auth, gateway.catalog)


# ----- catalogue ---------------------------------------------------------------------------

# Admins get the whole model (its URL's credentials masked), others the public part only.
ModelView = ModelOut | ModelPublicOut


def _view(model: ModelOut, principal: Principal) -> ModelView:
    if principal.can(P.GATEWAY_ADMIN):
        return model.masked()
    return ModelPublicOut.model_validate(model)


def _visible_model(request: Request, principal: Principal, model_id: str) -> ModelOut:
    """The model, if ``principal`` may see it (admins: any); else 404 as for an unknown one."""
    catalog = gateway_of(request).catalog
    if principal.can(P.GATEWAY_ADMIN):
        return catalog.get_model(model_id)
    return catalog.get_visible(principal, model_id)


@router.get("/models", response_model=list[ModelView])
async def list_models(request: Request, principal: Principal = READ) -> list[ModelView]:
    """The catalogue (admins see every model, others those they may use, without the backend
    URL, model path and runtime arguments)."""
    catalog = gateway_of(request).catalog
    if principal.can(P.GATEWAY_ADMIN):
        return [m.masked() for m in sorted(catalog.models.values(), key=lambda m: m.id)]
    return [ModelPublicOut.model_validate(m) for m in catalog.visible(principal)]


@router.post("/models", response_model=ModelOut, status_code=status.HTTP_201_CREATED)
async def create_model(body: ModelCreate, request: Request, principal: Principal = ADMIN) -> Any:
    """Register a model served by an OpenAI-compatible backend URL."""
    return (await gateway_of(request).catalog.create_model(body, actor=principal.actor)).masked()


@router.get("/models/{model_id}", response_model=ModelView)
async def get_model(model_id: str, request: Request, principal: Principal = READ) -> Any:
    """One model (non-admins: only one they may use, in its public form)."""
    return _view(_visible_model(request, principal, model_id), principal)


@router.patch("/models/{model_id}", response_model=ModelOut)
async def update_model(
    model_id: str, body: ModelUpdate, request: Request, principal: Principal = ADMIN
) -> Any:
    """Change fields of a model; those left out keep their value (so does a `backend_url`
    sent back as shown, credentials masked)."""
    catalog = gateway_of(request).catalog
    return (await catalog.update_model(model_id, body, actor=principal.actor)).masked()


@router.delete("/models/{model_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_model(
    model_id: str,
    request: Request,
    force: bool = Query(False, description="Also revoke the keys pinned to this model."),
    principal: Principal = ADMIN,
) -> None:
    """Delete a model; a managed model's backend is stopped first. Refused (409, with the
    keys listed) while keys are pinned to it, unless `force`: then those keys are revoked."""
    gateway = gateway_of(request)
    gateway.catalog.get_model(model_id)
    keys = _keys(request)
    pinned = await keys.pinned_to(model_id)
    if pinned and not force:
        listed = [{"id": k.id, "prefix": k.prefix, "name": k.name} for k in pinned]
        raise Conflict(
            f"{len(pinned)} key(s) are pinned to model {model_id!r}: "
            f"{[k.prefix for k in pinned]}; revoke them or delete with force=true",
            details={"keys": listed},
        )
    for key in pinned:
        await core_of(request).auth.revoke_key(key.id, actor=principal.actor)
    await gateway.supervisor.forget_model(model_id)
    await gateway.catalog.delete_model(model_id, actor=principal.actor)


@router.get("/categories", response_model=list[CategoryOut], dependencies=[READ])
async def list_categories(request: Request) -> Any:
    return sorted(gateway_of(request).catalog.categories.values(), key=lambda c: c.name)


@router.post("/categories", response_model=CategoryOut, status_code=status.HTTP_201_CREATED)
async def create_category(body: CategoryIn, request: Request, principal: Principal = ADMIN) -> Any:
    return await gateway_of(request).catalog.create_category(body, actor=principal.actor)


@router.patch("/categories/{name}", response_model=CategoryOut)
async def update_category(
    name: str, body: CategoryUpdate, request: Request, principal: Principal = ADMIN
) -> Any:
    return await gateway_of(request).catalog.update_category(name, body, actor=principal.actor)


@router.delete("/categories/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_category(name: str, request: Request, principal: Principal = ADMIN) -> None:
    await gateway_of(request).catalog.delete_category(name, actor=principal.actor)


def _backends(request: Request) -> list[dict[str, Any]]:
    gateway = gateway_of(request)
    out = []
    for model in sorted(gateway.catalog.models.values(), key=lambda m: m.id):
        pool = gateway.scheduler.pools.get(model.id)
        managed = gateway.supervisor.status(model.id) if model.managed else None
        out.append(
            {
                "model": model.id,
                "kind": model.backend_kind,
                "url": mask_url(model.backend_url),
                "ready": model.state == "ready",
                "state": managed.state if managed else model.state,
                "error": managed.error if managed else "",
                "replica": managed.replica if managed else None,
                "slots": model.parallel,
                "in_use": pool.in_use if pool else 0,
                "queue_depth": pool.depth if pool else 0,
            }
        )
    return out


@router.get("/backends", dependencies=[ADMIN])
async def list_backends(request: Request) -> list[dict[str, Any]]:
    """Each model's backend, its state (managed: starting/ready/failed/stopped) and slots."""
    return _backends(request)


@router.post("/backends/{model_id}/start", response_model=BackendStatus)
async def start_backend(
    model_id: str,
    request: Request,
    wait: bool = Query(False, description="Answer once the backend is ready or has failed."),
    principal: Principal = ADMIN,
) -> Any:
    """Launch a managed backend; it becomes ready once its health check answers 200."""
    return await gateway_of(request).supervisor.start_backend(
        model_id, actor=principal.actor, wait=wait
    )


@router.post("/backends/{model_id}/stop", response_model=BackendStatus)
async def stop_backend(model_id: str, request: Request, principal: Principal = ADMIN) -> Any:
    """Stop a managed backend: its queued requests get 503, its slots go away."""
    return await gateway_of(request).supervisor.stop_backend(model_id, actor=principal.actor)


@router.get("/backends/{model_id}/logs", response_class=PlainTextResponse, dependencies=[ADMIN])
async def backend_logs(
    model_id: str, request: Request, tail: int = Query(200, ge=1, le=10_000)
) -> str:
    """The last lines of a managed backend's output."""
    return await gateway_of(request).supervisor.logs(model_id, tail)


@router.post("/estimate", response_model=Estimate)
async def estimate_model(
    body: EstimateRequest, request: Request, principal: Principal = READ
) -> Any:
    """Memory to serve a GGUF model with `parallel` slots of `context` tokens, and whether it
    fits the detected GPUs or RAM (non-admins: only for a model they may use)."""
    model = _visible_model(request, principal, body.model_id)
    if not model.gguf:
        raise BadRequest(f"model {model.id!r} has no GGUF metadata (an external backend?)")
    found = await asyncio.to_thread(system.gpus)
    return estimate(
        model.id,
        GGUFInfo(**model.gguf),
        context=body.context or model.context_length,
        parallel=body.parallel or model.parallel,
        gpu_free_bytes=sum(g.memory_free_bytes for g in found),
        ram_available_bytes=system.ram_available(),
    )


@router.get("/system", dependencies=[ADMIN])
async def system_state(request: Request) -> dict[str, Any]:
    """Disk of the data directory, backends and their health, queues, slots, GPUs, RAM."""
    gateway = gateway_of(request)
    found = await asyncio.to_thread(system.gpus)
    return {
        "disk": (await asyncio.to_thread(system.disk, gateway.supervisor.root)).model_dump(),
        "ram_available_bytes": system.ram_available(),
        "gpus": [g.model_dump() for g in found],
        "backends": _backends(request),
    }


# ----- settings ----------------------------------------------------------------------------


@router.get("/settings", response_model=SchedulerSettings, dependencies=[READ])
async def get_settings(request: Request) -> Any:
    """The scheduler's weights and bounds."""
    return await gateway_of(request).get_settings()


@router.patch("/settings", response_model=SchedulerSettings)
async def update_settings(
    body: SchedulerSettingsUpdate, request: Request, principal: Principal = ADMIN
) -> Any:
    """Change scheduler settings; they apply to the next slot that frees."""
    return await gateway_of(request).update_settings(body, actor=principal.actor)


# ----- keys --------------------------------------------------------------------------------


@router.post("/keys", response_model=InferenceKeyCreated, status_code=status.HTTP_201_CREATED)
async def create_key(
    body: InferenceKeyCreate, request: Request, principal: Principal = READ
) -> Any:
    """Create an inference key (scope `inference`), optionally pinned; the key is shown once."""
    return await _keys(request).create(body, principal)


@router.get("/keys", response_model=list[InferenceKeyOut])
async def list_keys(
    request: Request,
    all_users: bool = Query(False, alias="all", description="Admins: everyone's keys."),
    principal: Principal = READ,
) -> Any:
    return await _keys(request).list(principal, everyone=all_users)


@router.delete("/keys/{key_id}", response_model=InferenceKeyOut)
async def revoke_key(key_id: str, request: Request, principal: Principal = READ) -> Any:
    """Revoke one of your inference keys (admins: anyone's)."""
    return await _keys(request).revoke(key_id, principal)


# ----- usage -------------------------------------------------------------------------------

PeriodQuery = Query(None, description="hour, day, week or month back from now (default day)")
SinceQuery = Query(
    None, description="Start of a range instead of a period (ISO 8601; no zone means UTC)."
)
UntilQuery = Query(None, description="End of the range, excluded (default now).")


def _window(period: Period | None, since: datetime | None, until: datetime | None) -> Window:
    try:
        return window(period, since, until)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


@router.get("/usage", response_model=UsageReport)
async def own_usage(
    request: Request,
    period: Period | None = PeriodQuery,
    since: datetime | None = SinceQuery,
    until: datetime | None = UntilQuery,
    principal: Principal = READ,
) -> Any:
    """Your own requests and tokens over a period or a range, by model and over time."""
    span = _window(period, since, until)
    if principal.user_id is None:
        raise BadRequest("usage is per user; this identity has none")
    return await report(core_of(request).db, span, user_id=principal.user_id, admin_view=False)


@router.get("/usage/all", response_model=UsageReport, dependencies=[ADMIN])
async def all_usage(
    request: Request,
    period: Period | None = PeriodQuery,
    since: datetime | None = SinceQuery,
    until: datetime | None = UntilQuery,
) -> Any:
    """Totals by user, model and key, and the timeline, for everyone."""
    span = _window(period, since, until)
    return await report(core_of(request).db, span, user_id=None, admin_view=True)


# ----- reservations ------------------------------------------------------------------------


@router.get("/reservations", response_model=list[ReservationOut])
async def list_reservations(request: Request, principal: Principal = READ) -> Any:
    """Admins see all reservations; others their own."""
    reservations = gateway_of(request).reservations
    if principal.can(P.GATEWAY_ADMIN):
        return await reservations.list()
    return await reservations.list(principal.user_id or "-")


@router.post("/reservations", response_model=ReservationOut, status_code=status.HTTP_201_CREATED)
async def create_reservation(
    body: ReservationCreate, request: Request, principal: Principal = READ
) -> Any:
    """Ask for exclusive use of the gateway over a window (30-minute boundaries, UTC)."""
    admin = principal.can(P.GATEWAY_ADMIN)
    if body.user is not None and not admin:
        raise BadRequest("user: only admins reserve for another user")
    if body.user is not None:
        user = await core_of(request).auth.get_user(body.user)
        user_id, username = user.id, user.username
    elif principal.user_id is None:
        raise BadRequest("user: required when authentication is disabled")
    else:
        user_id, username = principal.user_id, principal.username
    return await gateway_of(request).reservations.create(
        body, principal, user_id=user_id, username=username
    )


@router.post("/reservations/{reservation_id}/cancel", response_model=ReservationOut)
async def cancel_reservation(
    reservation_id: str, request: Request, principal: Principal = READ
) -> Any:
    """Cancel your pending or approved reservation."""
    return await gateway_of(request).reservations.transition(
        reservation_id, "cancel", principal, admin=principal.can(P.GATEWAY_ADMIN)
    )


@router.post("/reservations/{reservation_id}/{action}", response_model=ReservationOut)
async def decide_reservation(
    reservation_id: str,
    action: Literal["approve", "reject", "activate", "deactivate"],
    request: Request,
    principal: Principal = ADMIN,
) -> Any:
    """Approve, reject, activate now or deactivate (complete) a reservation."""
    assert action in TRANSITIONS
    return await gateway_of(request).reservations.transition(
        reservation_id, action, principal, admin=True
    )


@router.delete("/reservations/{reservation_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_reservation(
    reservation_id: str, request: Request, principal: Principal = ADMIN
) -> None:
    await gateway_of(request).reservations.delete(reservation_id, principal)


# ----- live metrics ------------------------------------------------------------------------


@router.get("/events", response_class=EventSourceResponse)
async def live_metrics(
    request: Request,
    principal: Principal = stream_place("live metrics", P.GATEWAY_READ, exempt=P.GATEWAY_ADMIN),
) -> AsyncIterator[ServerSentEvent]:
    """Every 2 s: queue depth and wait, slots in use, tokens/s per model, active reservation.
    The stream ends once its credential no longer holds (revoked, signed out, disabled)."""
    gateway = gateway_of(request)
    current: Principal | None = principal
    while current is not None and not await request.is_disconnected():
        snapshot = gateway.snapshot(current, admin=current.can(P.GATEWAY_ADMIN))
        yield ServerSentEvent(data=snapshot, event="gateway.metrics")
        if not await pause(request, LIVE_INTERVAL_S):
            return
        current = await still_allowed(request, P.GATEWAY_READ)


# ----- hub ---------------------------------------------------------------------------------


@router.get("/hub/search", response_model=list[hub.HubModel], dependencies=[ADMIN])
async def hub_search(
    q: str | None = Query(None, max_length=200, description="Text to search for."),
    task: str | None = Query(None, pattern=r"^[a-z0-9-]{1,64}$", description="Pipeline tag."),
    gguf: bool = Query(True, description="Only repositories with GGUF files."),
    limit: int = Query(20, ge=1, le=100),
    offset: int = Query(0, ge=0, le=1000),
) -> Any:
    """Search the hub (HF_ENDPOINT, HF_TOKEN) for models."""
    return await asyncio.to_thread(hub.search, q, task=task, gguf=gguf, limit=limit, offset=offset)


@router.get("/hub/files", response_model=list[hub.HubFile], dependencies=[ADMIN])
async def hub_files(
    repo: str = Query(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"),
    revision: str = Query("main", pattern=r"^[A-Za-z0-9._/-]{1,100}$"),
) -> Any:
    """Files of a hub repository with their sizes."""
    return await asyncio.to_thread(hub.files, repo, revision)


@router.get("/downloads", response_model=list[DownloadOut], dependencies=[ADMIN])
async def list_downloads(request: Request) -> Any:
    """Downloads with progress (bytes done/total, rate, ETA)."""
    return await gateway_of(request).downloads.list()


@router.post("/downloads", response_model=DownloadOut, status_code=status.HTTP_202_ACCEPTED)
async def create_download(
    body: DownloadRequest, request: Request, principal: Principal = ADMIN
) -> Any:
    """Fetch a GGUF in the background; it is registered as a model once complete.
    409 when the same file is already downloading or downloaded; 507 when the disk would
    pass 95% (space promised to running downloads included)."""
    return await gateway_of(request).downloads.create(body, actor=principal.actor)


@router.get("/downloads/{download_id}", response_model=DownloadOut, dependencies=[ADMIN])
async def get_download(download_id: str, request: Request) -> Any:
    return await gateway_of(request).downloads.get(download_id)


@router.post("/downloads/{download_id}/cancel", response_model=DownloadOut)
async def cancel_download(download_id: str, request: Request, principal: Principal = ADMIN) -> Any:
    """Stop a download and delete its partial file."""
    return await gateway_of(request).downloads.cancel(download_id, actor=principal.actor)
