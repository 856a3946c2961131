"""HTTP API of the brain: task runner, probe chat (REST and WebSocket) and fleet chat."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from legator.brain.dock import ActivateIn, ProfileIn, ProfileOut, ProfilePatch
from legator.brain.schemas import ChatIn, FleetChatIn, TaskIn
from legator.brain.service import BrainService
from legator.core.auth.permissions import Permission as P
from legator.core.auth.principal import Principal
from legator.core.errors import AppError
from legator.core.http.deps import _same_origin, cross_site, require

router = APIRouter(prefix="/api/v1", tags=["brain"])
ws_router = APIRouter(tags=["brain"])


def brain_of(request: Request) -> BrainService:
    return request.app.state.brain  # type: ignore[no-any-return]


@router.post("/probes/{probe_id}/task")
async def run_task(
    probe_id: str, body: TaskIn, request: Request, principal: Principal = require(P.FLEET_COMMAND)
) -> dict[str, Any]:
    """Run an agent loop towards ``goal`` on one probe; returns the transcript. Commands pass
    the gate; one that needs approval holds the task until it is decided."""
    return await brain_of(request).run_task(
        principal, probe_id, body.goal, max_steps=body.max_steps, timeout_s=body.timeout_s
    )


@router.post("/probes/{probe_id}/chat")
async def probe_chat(
    probe_id: str, body: ChatIn, request: Request, principal: Principal = require(P.FLEET_COMMAND)
) -> dict[str, Any]:
    """One message in a persistent per-probe conversation (omit ``session_id`` to start)."""
    return await brain_of(request).probe_chat(principal, probe_id, body.message, body.session_id)


@router.get("/probes/{probe_id}/chat/sessions")
async def probe_chat_sessions(
    probe_id: str, request: Request, principal: Principal = require(P.FLEET_READ)
) -> list[dict[str, Any]]:
    rows = await brain_of(request).sessions(principal, probe_id)
    return [
        {
            "id": row.id,
            "target": row.target,
            "messages": row.messages,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
        }
        for row in rows
    ]


@router.post("/fleet/chat")
async def fleet_chat(
    body: FleetChatIn, request: Request, principal: Principal = require(P.FLEET_COMMAND)
) -> dict[str, Any]:
    """Chat about a probe, a tag or the whole fleet; commands on a tag are one fan-out."""
    return await brain_of(request).fleet_chat(
        principal, body.message, probe=body.probe, tag=body.tag, session_id=body.session_id
    )


# ---- Model Dock ---------------------------------------------------------------------------


@router.get("/brain/profiles", response_model=list[ProfileOut])
async def list_profiles(
    request: Request, principal: Principal = require(P.FLEET_READ)
) -> list[ProfileOut]:
    """Model profiles with the features routed to each; keys are masked."""
    return await brain_of(request).dock.list()


@router.post("/brain/profiles", response_model=ProfileOut, status_code=201)
async def create_profile(
    body: ProfileIn, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> ProfileOut:
    """Add a profile; its ``api_key`` goes to the encrypted secrets store, never back out."""
    return await brain_of(request).dock.create(body, principal)


@router.patch("/brain/profiles/{profile_id}", response_model=ProfileOut)
async def update_profile(
    profile_id: str,
    body: ProfilePatch,
    request: Request,
    principal: Principal = require(P.FLEET_ADMIN),
) -> ProfileOut:
    return await brain_of(request).dock.update(profile_id, body, principal)


@router.delete("/brain/profiles/{profile_id}", status_code=204)
async def delete_profile(
    profile_id: str, request: Request, principal: Principal = require(P.FLEET_ADMIN)
) -> Response:
    """Remove a profile, its routes and its stored key."""
    await brain_of(request).dock.delete(profile_id, principal)
    return Response(status_code=204)


@router.post("/brain/profiles/{profile_id}/activate", response_model=ProfileOut)
async def activate_profile(
    profile_id: str,
    body: ActivateIn,
    request: Request,
    principal: Principal = require(P.FLEET_ADMIN),
) -> ProfileOut:
    """Route features (``probe_chat``, ``fleet_chat``, ``task``; default all) to this profile."""
    return await brain_of(request).dock.activate(profile_id, list(body.features), principal)


@router.get("/brain/usage")
async def brain_usage(
    request: Request, principal: Principal = require(P.FLEET_READ)
) -> list[dict[str, Any]]:
    """Model turns and tokens per profile (``env`` = the LEGATOR_LLM_* fallback) and feature."""
    return await brain_of(request).dock.usage()


@ws_router.websocket("/ws/chat")
async def chat_socket(
    websocket: WebSocket, principal: Principal = require(P.FLEET_COMMAND)
) -> None:
    """Streaming chat. Send ``{"message", "probe" | "tag" | neither (whole fleet),
    "session_id"?}``; receive ``token`` events as the model writes, ``tool`` events
    (command results, pending approvals), then ``done`` with the transcript, or ``error``."""
    # A browser's socket must come from our own pages: with a session cookie always, and with
    # authentication off (every caller an admin) whenever it names another site.
    if (principal.method == "session" and not _same_origin(websocket)) or (
        principal.method == "anonymous" and cross_site(websocket)
    ):
        await websocket.close(code=1008, reason="cross-site WebSocket refused")
        return
    await websocket.accept()
    brain: BrainService = websocket.app.state.brain

    async def on_token(text: str) -> None:
        await websocket.send_json({"type": "token", "text": text})

    async def emit(kind: str, data: dict[str, Any]) -> None:
        await websocket.send_json({"type": "tool", "event": kind, "data": _jsonable(data)})

    try:
        while True:
            raw = await websocket.receive_json()
            try:
                body = FleetChatIn.model_validate(raw)
                if body.probe and not body.tag:
                    result = await brain.probe_chat(
                        principal,
                        body.probe,
                        body.message,
                        body.session_id,
                        on_token=on_token,
                        emit=emit,
                    )
                else:
                    result = await brain.fleet_chat(
                        principal,
                        body.message,
                        tag=body.tag,
                        session_id=body.session_id,
                        on_token=on_token,
                        emit=emit,
                    )
            except ValidationError as exc:
                await websocket.send_json({"type": "error", "message": str(exc)})
                continue
            except AppError as exc:
                await websocket.send_json(
                    {"type": "error", "code": exc.code, "message": exc.message}
                )
                continue
            await websocket.send_json({"type": "done", **_jsonable(result)})
    except WebSocketDisconnect:
        return


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))  # type: ignore[no-any-return]
