"""HTTP API of the brain: task runner, probe chat (REST and WebSocket) and fleet chat.

A conversation can outlive its credential (a task waits for approvals; a chat socket stays
open for hours), so the credential is authenticated again, through the core, before each tool
call and, on the socket, before each message, every ``RECHECK_S`` and at its expiry."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from contextlib import suppress
from datetime import datetime
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnected

from legator.brain.dock import ActivateIn, ProfileIn, ProfileOut, ProfilePatch
from legator.brain.schemas import ChatIn, FleetChatIn, TaskIn
from legator.brain.service import BrainService, ensure_may_converse
from legator.core.auth.permissions import Permission as P
from legator.core.auth.principal import Principal
from legator.core.db.base import utcnow
from legator.core.errors import AppError, Forbidden, Unauthorized
from legator.core.http.deps import _same_origin, authenticate, cross_site, require
from legator.core.http.disconnect import ClientGone, unless_gone

# An open chat socket's credential is authenticated again before every message and tool
# call, and at least this often while the socket idles or a conversation waits (an approval).
RECHECK_S = 10.0
# Messages a client may send ahead of the answers; one more ends the socket.
INBOX_MAX = 16
# The most a message may be, in characters, as received: room for the longest valid one
# (``ChatIn.message``, escaped). One past it is not kept, and ends the socket.
MESSAGE_MAX_CHARS = 256 * 1024
# Chat sessions one list answers by default, the newest first: each message sent without a
# session starts one, each with its history, kept until deleted (by its owner or an admin)
# or idle past ``brain_session_retention_days``.
SESSIONS_LISTED = 50
POLICY_VIOLATION = 1008  # WebSocket close codes
MESSAGE_TOO_BIG = 1009

router = APIRouter(prefix="/api/v1", tags=["brain"])
ws_router = APIRouter(tags=["brain"])


def brain_of(conn: HTTPConnection) -> BrainService:
    return conn.app.state.brain  # type: ignore[no-any-return]


async def reauthenticate(conn: HTTPConnection) -> Principal:
    """The connection's own credential (its key or session) authenticated again by the core,
    now, with what a conversation needs: a key revoked, a user disabled or deleted, a session
    signed out or expired since the connection opened fail with 401 or 403."""
    conn.state.principal = None  # not the principal cached when the connection opened
    principal = await authenticate(conn)
    ensure_may_converse(principal)
    return principal


async def until_gone(
    request: Request, conversation: Awaitable[dict[str, Any]]
) -> dict[str, Any] | Response:
    """A conversation's result; the conversation is cancelled if its client disconnects
    first (it stops where it is, bills what the model spent and is audited as cancelled)."""
    try:
        return await unless_gone(request, conversation)
    except ClientGone:
        return Response(status_code=499)


@router.post("/probes/{probe_id}/task", response_model=None)
async def run_task(
    probe_id: str, body: TaskIn, request: Request, principal: Principal = require(P.FLEET_COMMAND)
) -> dict[str, Any] | Response:
    """Run an agent loop towards ``goal`` on one probe; returns the transcript. Commands pass
    the gate; one that needs approval holds the task until it is decided."""
    return await until_gone(
        request,
        brain_of(request).run_task(
            principal,
            probe_id,
            body.goal,
            max_steps=body.max_steps,
            timeout_s=body.timeout_s,
            recheck=partial(reauthenticate, request),
        ),
    )


@router.post("/probes/{probe_id}/chat", response_model=None)
async def probe_chat(
    probe_id: str, body: ChatIn, request: Request, principal: Principal = require(P.FLEET_COMMAND)
) -> dict[str, Any] | Response:
    """One message in a persistent per-probe conversation (omit ``session_id`` to start)."""
    return await until_gone(
        request,
        brain_of(request).probe_chat(
            principal,
            probe_id,
            body.message,
            body.session_id,
            recheck=partial(reauthenticate, request),
        ),
    )


@router.get("/probes/{probe_id}/chat/sessions")
async def probe_chat_sessions(
    probe_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=200)] = SESSIONS_LISTED,
    principal: Principal = require(P.FLEET_READ),
) -> list[dict[str, Any]]:
    """The caller's sessions about a probe (or ``all``, ``tag:…``), the newest first."""
    rows = await brain_of(request).sessions(principal, probe_id, limit)
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


@router.delete("/brain/sessions/{session_id}", status_code=204)
async def delete_chat_session(
    session_id: str, request: Request, principal: Principal = require(P.FLEET_READ)
) -> Response:
    """Delete one of the caller's chat sessions (an admin, ``fleet:admin``, anyone's); 404
    for another's."""
    await brain_of(request).delete_session(principal, session_id)
    return Response(status_code=204)


@router.post("/fleet/chat", response_model=None)
async def fleet_chat(
    body: FleetChatIn, request: Request, principal: Principal = require(P.FLEET_COMMAND)
) -> dict[str, Any] | Response:
    """Chat about a probe, a tag or the whole fleet; commands on a tag are one fan-out."""
    return await until_gone(
        request,
        brain_of(request).fleet_chat(
            principal,
            body.message,
            probe=body.probe,
            tag=body.tag,
            session_id=body.session_id,
            recheck=partial(reauthenticate, request),
        ),
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
    (command results, pending approvals), then ``done`` with the transcript, or ``error``.
    A credential that no longer holds gets an ``error`` and the close code 1008."""
    # A browser's socket must come from our own pages: with a session cookie always, and with
    # authentication off (every caller an admin) whenever it names another site.
    if (principal.method == "session" and not _same_origin(websocket)) or (
        principal.method == "anonymous" and cross_site(websocket)
    ):
        await websocket.close(code=POLICY_VIOLATION, reason="cross-site WebSocket refused")
        return
    try:
        ensure_may_converse(principal)  # fleet:read as well, as the REST routes need
    except Forbidden:
        await websocket.close(code=POLICY_VIOLATION, reason="needs fleet:command and fleet:read")
        return
    brain = brain_of(websocket)
    expires = await brain.credential_expiry(principal)
    await websocket.accept()
    await ChatSocket(websocket, brain, principal, expires).serve()


class ChatSocket:
    """One ``/ws/chat`` connection. A reader task queues what the client sends and notices at
    once when it goes; each message is answered in its own task, watched while it runs. The
    socket ends, cancelling the conversation (and so the approval it waits on), when the
    client goes, or when its credential fails a check: before each message and tool call,
    every ``RECHECK_S`` and at its expiry."""

    def __init__(
        self,
        websocket: WebSocket,
        brain: BrainService,
        principal: Principal,
        expires: datetime | None,
    ) -> None:
        self.websocket = websocket
        self.brain = brain
        self.principal = principal
        self.deadline = (
            None if expires is None else time.monotonic() + (expires - utcnow()).total_seconds()
        )
        self.inbox: asyncio.Queue[str | bytes] = asyncio.Queue(INBOX_MAX)
        self.gone = asyncio.Event()
        self.refusal: str | None = None  # why the credential no longer holds
        self.flooded = False
        self.oversized = False

    async def serve(self) -> None:
        reader = asyncio.ensure_future(self._read())
        try:
            while True:
                receiving = asyncio.ensure_future(self.inbox.get())
                if not await self._watch(receiving):
                    return
                if not await self._check():  # a fresh principal for each message
                    return
                answering = asyncio.ensure_future(self._answer(receiving.result()))
                if not await self._watch(answering) or not answering.result():
                    return
        finally:
            reader.cancel()
            await asyncio.wait({reader})
            await self._end()

    async def _read(self) -> None:
        # Not on cancellation (the socket ends on this side; the client may still be there):
        # on a disconnect, a failed connection or a flood, the client is gone.
        with suppress(RuntimeError, OSError):
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("text") or message.get("bytes") or ""
                if len(data) > MESSAGE_MAX_CHARS:  # no valid message is this long: end it
                    self.oversized = True
                    break
                try:
                    self.inbox.put_nowait(data)
                except asyncio.QueueFull:  # sends without reading the answers: end it
                    self.flooded = True
                    break
        self.gone.set()

    async def _watch(self, work: asyncio.Future[Any]) -> bool:
        """Wait for ``work`` while the client stays and its credential holds; otherwise
        cancel it, let it withdraw what it started (a pending approval), and return False."""
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            while True:
                await asyncio.wait(
                    {work, gone}, timeout=self._until_check(), return_when=asyncio.FIRST_COMPLETED
                )
                if gone.done():
                    return False
                if work.done():
                    return True
                if not await self._check():
                    return False
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                await asyncio.wait({work})

    def _until_check(self) -> float:
        if self.deadline is None:
            return RECHECK_S
        return max(0.0, min(RECHECK_S, self.deadline - time.monotonic()))

    async def _check(self) -> bool:
        try:
            await self._recheck()
        except AppError as exc:
            self.refusal = exc.message
            return False
        return True

    async def _recheck(self) -> Principal:
        """The socket's credential authenticated again, and not past its expiry; also what
        the toolbox calls before each tool call."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise Unauthorized("your credential has expired; connect again with a valid one")
        self.principal = await reauthenticate(self.websocket)
        return self.principal

    async def _answer(self, raw: str | bytes) -> bool:
        """Answer one message; False when the socket must end."""
        try:
            reply = {"type": "done", **_jsonable(await self._converse(raw))}
        except ValidationError as exc:
            reply = {"type": "error", "message": str(exc)}
        except (Unauthorized, Forbidden) as exc:  # the credential failed a tool call's check
            self.refusal = exc.message
            return False
        except AppError as exc:
            reply = {"type": "error", "code": exc.code, "message": exc.message}
        except (WebSocketDisconnect, WebSocketDisconnected):
            self.gone.set()
            return False
        try:
            await self._send(reply)
        except (WebSocketDisconnect, WebSocketDisconnected):
            self.gone.set()
            return False
        return True

    async def _converse(self, raw: str | bytes) -> dict[str, Any]:
        body = FleetChatIn.model_validate_json(raw)
        if body.probe and not body.tag:
            return await self.brain.probe_chat(
                self.principal,
                body.probe,
                body.message,
                body.session_id,
                on_token=self._token,
                emit=self._emit,
                recheck=self._recheck,
            )
        return await self.brain.fleet_chat(
            self.principal,
            body.message,
            tag=body.tag,
            session_id=body.session_id,
            on_token=self._token,
            emit=self._emit,
            recheck=self._recheck,
        )

    async def _send(self, data: dict[str, Any]) -> None:
        await self.websocket.send_json(data)

    async def _token(self, text: str) -> None:
        await self._send({"type": "token", "text": text})

    async def _emit(self, kind: str, data: dict[str, Any]) -> None:
        await self._send({"type": "tool", "event": kind, "data": _jsonable(data)})

    async def _end(self) -> None:
        """Tell a client whose credential failed why, and close the socket with 1008 (1009
        for a message too long)."""
        code, reason = POLICY_VIOLATION, "too many messages"
        if self.refusal is not None:
            reason = "credential refused"
        elif self.oversized:
            code, reason = MESSAGE_TOO_BIG, "message too long"
        elif not self.flooded:
            return  # the client went away, or an error ends the handler: closed as it is
        try:
            if self.refusal is not None and not self.gone.is_set():
                await self._send({"type": "error", "code": "unauthorized", "message": self.refusal})
            await self.websocket.close(code=code, reason=reason)
        except (WebSocketDisconnect, WebSocketDisconnected, RuntimeError, OSError):
            pass  # gone meanwhile


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))  # type: ignore[no-any-return]
