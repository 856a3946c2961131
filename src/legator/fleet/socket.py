"""``GET /ws/probe``: the probe's socket. Authenticated by the probe key before upgrade."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from legator.core.audit.sanitiser import clip_for_log
from legator.core.auth.permissions import Permission
from legator.core.http.deps import bearer_credential, require
from legator.core.logging import get_logger
from legator.fleet import protocol as p
from legator.fleet.protocol import Ack, CommandResult, Envelope, FileResult, Heartbeat, OutputChunk
from legator.fleet.wing import Fleet, fleet_of

log = get_logger("legator.fleet.socket")
router = APIRouter(tags=["fleet"])
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@router.websocket("/ws/probe", dependencies=[require(Permission.PUBLIC)])
async def probe_socket(websocket: WebSocket) -> None:
    """Probes authenticate with their own key (not a user API key), so the route is public
    at the permission layer and checks the probe key itself, before accepting."""
    fleet = fleet_of(websocket)
    key = bearer_credential(websocket)
    probe = await fleet.registry.authenticate(key) if key else None
    if probe is None:
        await websocket.send_denial_response(
            JSONResponse(
                {"error": {"code": "unauthorized", "message": "invalid or missing probe key"}},
                status_code=401,
            )
        )
        return
    await websocket.accept()
    # Signs with the key of the enrolment this probe key belongs to; None: it was replaced.
    conn = await fleet.hub.attach(probe.id, websocket, probe.key_salt)
    if conn is None:
        return
    await fleet.registry.on_connect(probe.id)
    pusher = _PolicyPusher(fleet, probe.id)
    try:
        while True:
            text = await websocket.receive_text()
            if len(text) > MAX_MESSAGE_BYTES:
                log.warning("oversized probe message dropped", probe_id=probe.id)
                continue
            await _handle(fleet, probe.id, text, pusher)
    except WebSocketDisconnect:
        pass
    finally:
        pusher.cancel()
        if fleet.hub.detach(conn):
            await fleet.registry.on_disconnect(probe.id)


class _PolicyPusher:
    """The policy push a ``hello`` asks for: at most one in flight per connection. Hellos
    arriving while one is in flight are coalesced into a single push after it, so a probe
    repeating ``hello`` (and not reading its socket) cannot pile up pushes."""

    def __init__(self, fleet: Fleet, probe_id: str) -> None:
        self.fleet = fleet
        self.probe_id = probe_id
        self.task: asyncio.Future[None] | None = None
        self.again = False

    def request(self) -> None:
        if self.task is not None and not self.task.done():
            self.again = True
            return
        # The probe's ack arrives through the socket's loop: push without waiting.
        self.task = task = asyncio.ensure_future(self._run())
        _pushes.add(task)
        task.add_done_callback(_pushes.discard)

    async def _run(self) -> None:
        while True:
            self.again = False
            await _quiet(self.fleet.actions.push_policy(self.probe_id))
            if not self.again:
                return

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


async def _handle(fleet: Fleet, probe_id: str, text: str, pusher: _PolicyPusher) -> None:
    try:
        envelope = Envelope.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        log.warning("malformed probe message", probe_id=probe_id, error=clip_for_log(str(exc), 200))
        return
    fleet.registry.touch(probe_id)
    payload = envelope.payload
    try:
        match envelope.type:
            case p.T_HEARTBEAT:
                beat = Heartbeat.model_validate(payload)
                fleet.registry.heartbeat(probe_id, beat.model_dump())
            case p.T_COMMAND_RESULT:
                await fleet.commands.on_result(probe_id, CommandResult.model_validate(payload))
            case p.T_OUTPUT:
                await fleet.commands.on_chunk(probe_id, OutputChunk.model_validate(payload))
            case p.T_ACK:
                ack = Ack.model_validate(payload)
                fleet.hub.resolve(ack.ref, ack)
            case p.T_FILE_RESULT:
                result = FileResult.model_validate(payload)
                fleet.hub.resolve(result.request_id, result)
            case p.T_INVENTORY:
                await fleet.registry.save_inventory(probe_id, payload)
            case p.T_HELLO:
                await fleet.registry.on_hello(probe_id, payload)
                pusher.request()
            case _:
                log.warning("unknown probe message type", probe_id=probe_id, type=envelope.type)
    except ValidationError as exc:
        log.warning(
            "invalid probe payload",
            probe_id=probe_id,
            type=envelope.type,
            error=clip_for_log(str(exc), 300),
        )
    except Exception:
        # One bad message must not take the probe's socket down with it.
        log.exception("probe message handling failed", probe_id=probe_id, type=envelope.type)


_pushes: set[asyncio.Future[None]] = set()


async def _quiet(coro: Awaitable[object]) -> None:
    try:
        await coro
    except Exception as exc:
        log.warning("policy push on connect failed", error=clip_for_log(str(exc), 200))
