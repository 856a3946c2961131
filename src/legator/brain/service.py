"""Probe chat, fleet chat and the task runner: prompts, sessions, limits and audit."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import select

from legator.brain.agent import Transcript, converse
from legator.brain.dock import ModelDock
from legator.brain.models import ChatSession
from legator.brain.providers import (
    OnToken,
    Provider,
    ProviderConfig,
    ProviderPool,
    check_config,
)
from legator.brain.tools import MAX_LISTED_PROBES, Emit, OpenApprovals, Recheck, Toolbox
from legator.core.audit.service import AuditFilter
from legator.core.auth.models import Session
from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.db import Database, retention
from legator.core.db.base import utcnow
from legator.core.errors import (
    AppError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    TooManyRequests,
)
from legator.core.runtime import Core

SYSTEM = (
    "You are Legator's operations assistant. You act on hosts only through the tools given; "
    "every command passes a policy gate and may wait for a human approval or be refused. "
    "Prefer read-only diagnosis first; propose changes only when the evidence calls for "
    "them, with a short reason. Answer concisely."
)

HISTORY_TOKEN_BUDGET = 6000
# Chats and tasks one user may run at once (per server process): each holds a model stream,
# spends the provider's tokens and may wait for an approval up to its time limit.
MAX_CONVERSATIONS_PER_USER = 8


# What a conversation needs: it runs commands (``fleet:command``, the routes' permission) and
# shows the model fleet data, the probe's inventory, health, policy and recent commands, and
# the read tools (``fleet:read``, what those views need over REST and MCP).
CONVERSATION_PERMISSIONS = (Permission.FLEET_COMMAND, Permission.FLEET_READ)


def ensure_may_converse(principal: Principal) -> None:
    missing = [p.value for p in CONVERSATION_PERMISSIONS if not principal.can(p)]
    if missing:
        raise Forbidden(
            "chat and tasks need both 'fleet:command' and 'fleet:read' (the model is shown "
            f"the fleet's data); this caller lacks {', '.join(repr(m) for m in missing)}"
        )


def _tokens(message: dict[str, Any]) -> int:
    # A rough count (4 characters a token) is enough to keep a history inside its budget.
    return len(json.dumps(message, default=str)) // 4 + 4


def trim_history(messages: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Drop the oldest exchanges until the history fits, never the last exchange (from the
    last user message on), and never leaving a tool result without its call."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=0)
    kept = list(messages)
    start = 0
    while start < last_user and sum(_tokens(m) for m in kept[start:]) > budget:
        start += 1
        while start < last_user and kept[start]["role"] != "user":
            start += 1
    return kept[start:]


def probe_listing(rows: list[Any]) -> str:
    """Fleet chat's list of its probes for the system prompt, sent with every model request:
    at most ``MAX_LISTED_PROBES``, then how many more there are."""
    lines = [
        f"- {p.id} {p.hostname} status={p.status} tags={','.join(p.tags or [])}"
        for p in rows[:MAX_LISTED_PROBES]
    ]
    if len(rows) > MAX_LISTED_PROBES:
        more = len(rows) - MAX_LISTED_PROBES
        lines.append(f"- … and {more} more of {len(rows)} probes (list_probes with a tag)")
    return "\n".join(lines)


def ended_from_outside(exc: BaseException) -> dict[str, str]:
    """How a conversation ended from outside, for its audit record: its credential no longer
    held (``Toolbox.recheck``), or it was cancelled (its client gone, the server stopping)."""
    if isinstance(exc, AppError):
        return {"status": "unauthorized", "error": exc.message}
    return {"status": "cancelled", "error": "the caller went away, or the server stopped"}


class BrainService:
    def __init__(self, core: Core, state: Any) -> None:
        self.core = core
        self.state = state
        self.settings = core.settings
        self.dock = ModelDock(core, state)
        # One SDK client per provider, base URL and key, shared by every call and closed
        # when its profile changes or goes, and at shutdown.
        self.clients = ProviderPool()
        # The approvals conversations wait on: cancelled when their conversation ends first,
        # and at shutdown (this hook runs before the fleet's, while the database is open).
        self.open_approvals = OpenApprovals(state)
        self.running: Counter[str] = Counter()  # conversations under way, per user
        self.answering: set[str] = set()  # chat sessions a message is being answered in
        core.shutdown_hooks.append(self.aclose)

    @asynccontextmanager
    async def _slot(self, principal: Principal) -> AsyncIterator[None]:
        """One of the caller's ``MAX_CONVERSATIONS_PER_USER``, for a conversation's length."""
        actor = principal.actor
        if self.running[actor] >= MAX_CONVERSATIONS_PER_USER:
            raise TooManyRequests(
                f"at most {MAX_CONVERSATIONS_PER_USER} chats and tasks of one user run at "
                "once; try again when one has ended"
            )
        self.running[actor] += 1
        try:
            yield
        finally:
            self.running[actor] -= 1
            if not self.running[actor]:
                del self.running[actor]

    @asynccontextmanager
    async def _answering(self, session_id: str | None) -> AsyncIterator[None]:
        """One message at a time in a session: each writes back the history it read, so a
        second at once would erase the first's exchange."""
        if session_id is None:  # a new session: nobody else has its id yet
            yield
            return
        if session_id in self.answering:
            raise Conflict(
                f"chat session {session_id} is answering another message; send this one "
                "when it has ended"
            )
        self.answering.add(session_id)
        try:
            yield
        finally:
            self.answering.discard(session_id)

    async def aclose(self) -> None:
        await self.open_approvals.aclose()
        await self.clients.aclose()

    async def credential_expiry(self, principal: Principal) -> datetime | None:
        """When the principal's key or session expires (None: never, or no credential, as
        with authentication off). A connection that outlives it must end there."""
        if principal.method == "api_key" and principal.key_id:
            try:
                key = await self.core.auth.get_key(principal.key_id)
            except NotFound:
                return utcnow()  # gone: over already
            return key.expires_at
        if principal.method == "session" and principal.session_id:
            async with self.core.db.session() as session:
                expires: datetime | None = await session.scalar(
                    select(Session.expires_at).where(Session.id == principal.session_id)
                )
            return expires or utcnow()  # gone: over already
        return None

    async def resolve(self, feature: str) -> tuple[str, ProviderConfig]:
        """The profile routed to ``feature`` (Model Dock), else the LEGATOR_LLM_* one, and its
        config; 503 when there is none. Builds no client."""
        profile, config = await self.dock.resolve(feature)
        return profile, check_config(config, getattr(self.state, "gateway", None))

    def provider(
        self, feature: str, config: ProviderConfig
    ) -> AbstractAsyncContextManager[Provider]:
        """The provider for ``config`` on its shared client, for the length of one call."""
        return self.clients.lease(feature, config, getattr(self.state, "gateway", None))

    async def _account(self, profile: str, feature: str, transcript: Transcript) -> None:
        await self.dock.account(
            profile,
            feature,
            transcript.input_tokens,
            transcript.output_tokens,
            len(transcript.steps),
        )

    def _toolbox(
        self,
        principal: Principal,
        origin: str,
        *,
        allowed: set[str] | None = None,
        fleet_tags: bool = False,
        emit: Emit | None = None,
        recheck: Recheck | None = None,
    ) -> Toolbox:
        return Toolbox(
            self.state,
            principal,
            origin=origin,
            approval_wait_s=self.settings.brain_approval_wait_s,
            output_chars=self.settings.brain_output_chars,
            allowed_probes=allowed,
            fleet_tags=fleet_tags,
            emit=emit,
            recheck=recheck,
            open_approvals=self.open_approvals,
        )

    async def _probe_context(self, probe_id: str) -> str:
        fleet = self.state.fleet
        detail = await fleet.registry.detail(probe_id)
        health = await fleet.registry.health(probe_id)
        probe = await fleet.registry.get(probe_id)
        policy, policy_name = await fleet.commands.effective_policy(probe)
        inventory = json.dumps(detail.inventory, default=str)[:3000]
        events, _ = await self.core.audit.query(
            AuditFilter(action="fleet.command.dispatch", target=probe_id), limit=5
        )
        recent = "; ".join(
            f"{e.ts:%Y-%m-%d %H:%M} {e.actor}: "
            + " ".join([str(e.details.get("command", "")), *map(str, e.details.get("args") or [])])
            + f" (request {e.details.get('request_id')})"
            for e in events
        )
        return (
            f"Target probe: {probe_id} (hostname {detail.hostname}, os {detail.os}, "
            f"status {detail.status}, tags {', '.join(detail.tags) or 'none'}).\n"
            f"Health: {health.score}/100 {'; '.join(health.reasons)}\n"
            f"Policy: {policy_name} (level {policy.level}).\n"
            f"Recent commands: {recent or 'none'}\n"
            f"Inventory (abridged): {inventory}"
        )

    async def _audit(self, principal: Principal, action: str, target: str, details: Any) -> None:
        await self.core.audit.log(
            actor=principal.actor, action=action, target=target, details=details
        )

    # ---- task runner ---------------------------------------------------------------------

    async def run_task(
        self,
        principal: Principal,
        probe_id: str,
        goal: str,
        *,
        max_steps: int | None = None,
        timeout_s: float | None = None,
        emit: Emit | None = None,
        recheck: Recheck | None = None,
    ) -> dict[str, Any]:
        """``recheck`` authenticates the caller again before each tool call (see Toolbox)."""
        ensure_may_converse(principal)
        profile, config = await self.resolve("task")  # 503 first when none is configured
        await self.state.fleet.registry.get(probe_id)  # 404 before any model call
        system = f"{SYSTEM}\n\n{await self._probe_context(probe_id)}"
        messages: list[dict[str, Any]] = [{"role": "user", "content": f"Goal: {goal}"}]
        toolbox = self._toolbox(principal, "task", allowed={probe_id}, emit=emit, recheck=recheck)

        async def on_step(step: dict[str, Any]) -> None:
            await self._audit(principal, "brain.task.step", probe_id, {"goal": goal, **step})

        steps_limit, time_limit = self.settings.brain_max_steps, self.settings.brain_task_timeout_s
        transcript = Transcript()
        async with self._slot(principal), self.provider("task", config) as provider:
            try:
                await converse(
                    provider,
                    system,
                    messages,
                    toolbox,
                    # The operator's settings are the most a task may take; it may ask less.
                    max_steps=min(max_steps or steps_limit, steps_limit),
                    timeout_s=min(timeout_s or time_limit, time_limit),
                    on_step=on_step,
                    transcript=transcript,
                )
            except (AppError, asyncio.CancelledError) as exc:
                await self._account(profile, "task", transcript)  # spent all the same
                await self._audit(
                    principal,
                    "brain.task.finished",
                    probe_id,
                    {"goal": goal, **ended_from_outside(exc)},
                )
                raise
        await self._account(profile, "task", transcript)
        await self._audit(
            principal,
            "brain.task.finished",
            probe_id,
            {"goal": goal, "status": transcript.status, "error": transcript.error},
        )
        return {
            "probe_id": probe_id,
            "goal": goal,
            "profile": profile,
            "model": config.model,
            **transcript.as_dict(),
        }

    # ---- chat ----------------------------------------------------------------------------

    async def _session(
        self, principal: Principal, scope: str, target: str, session_id: str | None
    ) -> ChatSession:
        if session_id is None:
            return ChatSession(scope=scope, target=target, owner=principal.actor, messages=[])
        async with self.core.db.session() as session:
            row = await session.get(ChatSession, session_id)
        if row is None or row.owner != principal.actor or row.target != target:
            raise NotFound(f"no chat session {session_id} for {target}")
        return row

    async def _save(self, row: ChatSession, messages: list[dict[str, Any]]) -> None:
        async with self.core.db.write() as session:
            stored = await session.get(ChatSession, row.id) if row.id else None
            if stored is None:
                row.messages = messages
                session.add(row)
            else:
                stored.messages = messages
                stored.updated_at = utcnow()

    async def _chat(
        self,
        principal: Principal,
        *,
        scope: str,
        target: str,
        system: str,
        message: str,
        session_id: str | None,
        toolbox: Toolbox,
        on_token: OnToken | None,
        feature: str,
        resolved: tuple[str, ProviderConfig],
    ) -> dict[str, Any]:
        profile, config = resolved
        row = await self._session(principal, scope, target, session_id)
        history = trim_history(
            [*(row.messages or []), {"role": "user", "content": message}], HISTORY_TOKEN_BUDGET
        )
        messages = list(history)
        transcript = Transcript()
        async with (
            self._answering(row.id),
            self._slot(principal),
            self.provider(feature, config) as provider,
        ):
            try:
                await converse(
                    provider,
                    system,
                    messages,
                    toolbox,
                    max_steps=self.settings.brain_max_steps,
                    timeout_s=self.settings.brain_task_timeout_s,
                    on_token=on_token,
                    transcript=transcript,
                )
            except (AppError, asyncio.CancelledError) as exc:
                # Spent all the same. The session is left as it was: a turn cancelled between
                # a tool call and its result would leave a history no model accepts.
                await self._account(profile, feature, transcript)
                await self._audit(
                    principal,
                    f"brain.{scope}_chat",
                    target,
                    {"session": row.id, **ended_from_outside(exc)},
                )
                raise
        await self._account(profile, feature, transcript)
        if transcript.status != "completed":
            # What ran stays in the session; the note keeps the turns alternating.
            ended = f"[this turn ended: {transcript.status}: {transcript.error or 'no answer'}]"
            messages.append({"role": "assistant", "content": ended})
        await self._save(row, messages)
        await self._audit(
            principal,
            f"brain.{scope}_chat",
            target,
            {"session": row.id, "status": transcript.status, "steps": len(transcript.steps)},
        )
        return {"session_id": row.id, "target": target, **transcript.as_dict()}

    async def probe_chat(
        self,
        principal: Principal,
        probe_id: str,
        message: str,
        session_id: str | None = None,
        *,
        on_token: OnToken | None = None,
        emit: Emit | None = None,
        recheck: Recheck | None = None,
    ) -> dict[str, Any]:
        ensure_may_converse(principal)
        resolved = await self.resolve("probe_chat")  # 503 first when none is configured
        await self.state.fleet.registry.get(probe_id)
        return await self._chat(
            feature="probe_chat",
            resolved=resolved,
            principal=principal,
            scope="probe",
            target=probe_id,
            system=f"{SYSTEM}\n\n{await self._probe_context(probe_id)}",
            message=message,
            session_id=session_id,
            toolbox=self._toolbox(
                principal, "chat", allowed={probe_id}, emit=emit, recheck=recheck
            ),
            on_token=on_token,
        )

    async def fleet_chat(
        self,
        principal: Principal,
        message: str,
        *,
        probe: str | None = None,
        tag: str | None = None,
        session_id: str | None = None,
        on_token: OnToken | None = None,
        emit: Emit | None = None,
        recheck: Recheck | None = None,
    ) -> dict[str, Any]:
        ensure_may_converse(principal)
        resolved = await self.resolve("fleet_chat")  # 503 first when none is configured
        if probe and tag:
            raise BadRequest("give either a probe or a tag, not both")
        registry = self.state.fleet.registry
        if probe:
            rows = [await registry.get(probe)]
            target = probe
        elif tag:
            rows = await registry.rows(tag=tag)
            if not rows:
                raise NotFound(f"no probe has the tag {tag!r}")
            target = f"tag:{tag}"
        else:
            rows = await registry.rows()
            target = "all"
        listing = probe_listing(rows)
        system = f"{SYSTEM}\n\nThis conversation covers {target}. Probes:\n{listing}\n" + (
            f"Use run_on_tag with tag {tag!r} to act on all of them at once." if tag else ""
        )
        return await self._chat(
            feature="fleet_chat",
            resolved=resolved,
            principal=principal,
            scope="fleet",
            target=target,
            system=system,
            message=message,
            session_id=session_id,
            toolbox=self._toolbox(
                principal,
                "fleet_chat",
                allowed={p.id for p in rows},
                fleet_tags=True,
                emit=emit,
                recheck=recheck,
            ),
            on_token=on_token,
        )

    async def delete_session(self, principal: Principal, session_id: str) -> None:
        """Delete a chat session: the owner's own, or any with ``fleet:admin``. Anyone else's
        is not found (whether it exists is not theirs to know); one answering a message is
        left to end first, as its answer would write it back."""
        async with self.core.db.write() as session:
            row = await session.get(ChatSession, session_id)
            if row is None or not (
                row.owner == principal.actor or principal.can(Permission.FLEET_ADMIN)
            ):
                raise NotFound(f"no chat session {session_id}")
            if session_id in self.answering:
                raise Conflict(
                    f"chat session {session_id} is answering a message; delete it when it has ended"
                )
            details = {"owner": row.owner, "target": row.target}
            await session.delete(row)
        await self._audit(principal, "brain.session.delete", session_id, details)

    async def sessions(self, principal: Principal, target: str, limit: int) -> list[ChatSession]:
        async with self.core.db.session() as session:
            rows = await session.scalars(
                select(ChatSession)
                .where(ChatSession.owner == principal.actor, ChatSession.target == target)
                .order_by(ChatSession.updated_at.desc())
                .limit(limit)
            )
            return list(rows)


async def prune_sessions(db: Database, before: datetime) -> int:
    """Delete the chat sessions not updated since ``before``; returns how many went."""
    return await retention.prune(db, ChatSession.id, ChatSession.updated_at, before)
