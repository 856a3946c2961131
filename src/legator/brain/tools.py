"""The tools a model may call, and their execution through the fleet's services.

``run_command`` goes through ``CommandService.run`` (the one gate): allowed commands run and
return their result; queued ones wait for the human decision and then read the result of the
command the approval queue dispatched (once); denials are returned to the model as text.

Each call first checks the conversation's credential again (``recheck``) where the caller gives
one, so a key revoked or a user disabled mid-conversation runs nothing more, and each tool needs
the permission its REST route needs. An approval a conversation waits on is cancelled when the
conversation ends before the decision (the client went away, the server shuts down), so it
cannot run later with nobody waiting for it."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.errors import AppError
from legator.core.logging import get_logger
from legator.fleet.schemas import CommandRequest

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
# Authenticates the conversation's caller again and returns the principal as it is now; raises
# ``Unauthorized`` or ``Forbidden`` when the credential no longer holds, which ends the
# conversation.
Recheck = Callable[[], Awaitable[Principal]]

log = get_logger("legator.brain")

ENDED = "the conversation ended before a decision"
SHUTDOWN = "the server shut down before a decision"


_STR = {"type": "string"}

TOOLS: list[dict[str, Any]] = [
    {
        "name": "run_command",
        "description": (
            "Run a command on a probe (host). It passes the fleet's policy gate: it may run, "
            "wait for a human approval, or be refused. Give the reason you need it."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "probe": {**_STR, "description": "probe id"},
                "command": {**_STR, "description": "program, or a shell line when shell=true"},
                "args": {"type": "array", "items": _STR},
                "shell": {"type": "boolean"},
                "reason": _STR,
            },
            "required": ["probe", "command", "reason"],
        },
    },
    {
        "name": "read_file",
        "description": "Read a file on a probe (within its policy's paths).",
        "parameters": {
            "type": "object",
            "properties": {"probe": _STR, "path": _STR},
            "required": ["probe", "path"],
        },
    },
    {
        "name": "search_files",
        "description": "Search a file on a probe for a regular expression.",
        "parameters": {
            "type": "object",
            "properties": {"probe": _STR, "path": _STR, "pattern": _STR},
            "required": ["probe", "path", "pattern"],
        },
    },
    {
        "name": "get_inventory",
        "description": "A probe's inventory: OS, kernel, CPUs, memory, disks, services.",
        "parameters": {"type": "object", "properties": {"probe": _STR}, "required": ["probe"]},
    },
    {
        "name": "get_health",
        "description": "A probe's health score (0-100) with reasons.",
        "parameters": {"type": "object", "properties": {"probe": _STR}, "required": ["probe"]},
    },
    {
        "name": "list_probes",
        "description": "List probes, optionally only those with a tag.",
        "parameters": {"type": "object", "properties": {"tag": _STR}},
    },
    {
        "name": "get_command_result",
        "description": "The status and output of an earlier command by its request id.",
        "parameters": {
            "type": "object",
            "properties": {"request_id": _STR},
            "required": ["request_id"],
        },
    },
]


FLEET_TOOL: dict[str, Any] = {
    "name": "run_on_tag",
    "description": (
        "Run one command on every probe with a tag (a fan-out). One policy decision covers "
        "the group; it may run, wait for one approval, or be refused per probe."
    ),
    "parameters": {
        "type": "object",
        "properties": {
            "tag": _STR,
            "command": _STR,
            "args": {"type": "array", "items": _STR},
            "shell": {"type": "boolean"},
            "reason": _STR,
        },
        "required": ["tag", "command", "reason"],
    },
}


# What each tool needs, as over REST: views need ``fleet:read``; commands and file reads (which
# run on the host) ``fleet:command``.
TOOL_PERMISSIONS: dict[str, Permission] = {
    "run_command": Permission.FLEET_COMMAND,
    "run_on_tag": Permission.FLEET_COMMAND,
    "read_file": Permission.FLEET_COMMAND,
    "search_files": Permission.FLEET_COMMAND,
    "get_inventory": Permission.FLEET_READ,
    "get_health": Permission.FLEET_READ,
    "list_probes": Permission.FLEET_READ,
    "get_command_result": Permission.FLEET_READ,
}


# The most probes one list shows the model (``list_probes``, fleet chat's prompt); past it, a
# count of the rest and how to narrow the list.
MAX_LISTED_PROBES = 100
# The least of each stream a fan-out shows of one probe, however many probes share its result.
FAN_OUT_MIN_STREAM_CHARS = 200
FAN_OUT_FIELDS_CHARS = 200  # room for one probe's fields other than its streams, and the summary
# What the transcript and the ``command_result`` event keep of one fan-out (at least two
# results' room, where an operator asks for longer outputs), and of all the fan-outs of one
# conversation: past these, probes are counted but not recorded. The fleet's command records
# keep each probe's whole output.
FAN_OUT_RECORD_CHARS = 64_000
CONVERSATION_RECORD_CHARS = 1_000_000
WHOLE_OUTPUT = (
    "each probe's whole output: GET /api/v1/commands/{request_id}; the request ids of probes "
    "not recorded are in the audit log's fleet.command.dispatch events (target: the probe)"
)


def result_chars(output_chars: int) -> int:
    """The most one tool result puts into the conversation (``agent.converse`` cuts the rest):
    one command's two streams of ``output_chars`` whole, with room for its other fields."""
    return 2 * output_chars + 1_000


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n…[truncated: {len(text) - limit} more characters]"


def command_view(row: Any, limit: int) -> dict[str, Any]:
    """A command's result with each stream cut at ``limit``."""
    return {
        "request_id": row.id,
        "status": row.status,
        "exit_code": row.exit_code,
        "stdout": truncate(row.stdout or "", limit),
        "stderr": truncate(row.stderr or "", limit),
        "error": row.error,
    }


def probe_view(ended: Any, limit: int) -> dict[str, Any]:
    """One probe of a fan-out: its command's result, or (a dict) why it has none."""
    return ended if isinstance(ended, dict) else command_view(ended, limit)


def _stream_chars(ended: Any, limit: int | None = None) -> int:
    """The characters of a probe's two streams, each at most ``limit`` (None: whole)."""
    if isinstance(ended, dict):
        return 0
    sizes = (len(ended.stdout or ""), len(ended.stderr or ""))
    return sum(sizes if limit is None else (min(size, limit) for size in sizes))


def fan_out_record(ended: dict[str, Any], output_chars: int, room: int) -> dict[str, Any]:
    """What the transcript keeps of a fan-out, in about ``room`` characters: a count of
    outcomes, then each probe's result (its streams cut to an equal share of the room, at
    most ``output_chars``), those that did not end well first, as many as fit; and, where
    any output was left out, how many probes and characters, and where to read them whole."""
    count = max(1, len(ended))
    share = max(FAN_OUT_MIN_STREAM_CHARS, min(output_chars, room // (2 * count)))
    views = {probe: probe_view(value, share) for probe, value in ended.items()}
    outcomes = Counter(_outcome(view) for view in views.values())
    results: dict[str, Any] = {}
    used = 0
    for probe in sorted(views, key=lambda p: _outcome(views[p]) == "completed, exit 0"):
        size = len(json.dumps({probe: views[probe]}))
        if used + size > room:
            break
        results[probe] = views[probe]
        used += size
    record: dict[str, Any] = {"probes": len(ended), "outcomes": dict(outcomes)}
    record["results"] = results
    whole = sum(_stream_chars(value) for value in ended.values())
    kept = sum(_stream_chars(ended[probe], share) for probe in results)
    if len(results) < len(ended) or kept < whole:
        record["not_recorded"] = {
            "probes": len(ended) - len(results),
            "characters": whole - kept,
            "where": WHOLE_OUTPUT,
        }
    return record


class OpenApprovals:
    """The approvals conversations are waiting on, shared by every toolbox of a server: one
    whose conversation ends undecided is cancelled, and at shutdown all still open are."""

    def __init__(self, state: Any) -> None:
        self.state = state  # the app's state: its approval service, once the fleet installs it
        self._open: dict[str, Principal] = {}
        self._cancelling: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._open)

    def hold(self, approval_id: str, principal: Principal) -> None:
        self._open[approval_id] = principal

    def release(self, approval_id: str) -> None:
        self._open.pop(approval_id, None)

    async def abandon(self, approval_id: str, reason: str) -> None:
        """Cancel the approval if nobody has decided it yet. The cancellation runs in its own
        task, shielded: a caller being cancelled (the reason we are here) does not stop it."""
        principal = self._open.pop(approval_id, None)
        if principal is None:
            return
        task = asyncio.ensure_future(self._cancel(approval_id, principal, reason))
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)
        await asyncio.shield(task)

    async def _cancel(self, approval_id: str, principal: Principal, reason: str) -> None:
        try:
            await self.state.approvals.cancel(approval_id, principal, reason)
        except AppError:
            pass  # decided (or cancelled) in the meantime: nothing left to withdraw
        except Exception:
            log.exception("could not cancel an abandoned approval", approval=approval_id)
        else:
            log.info("approval cancelled", approval=approval_id, reason=reason)

    async def aclose(self) -> None:
        """At shutdown: cancel every approval a conversation still waits on, and let the
        cancellations under way finish while the database is still open."""
        for approval_id in list(self._open):
            await self.abandon(approval_id, SHUTDOWN)
        if self._cancelling:
            await asyncio.gather(*self._cancelling, return_exceptions=True)


@dataclass
class ToolOutcome:
    """What the model sees (``content``) and what the transcript keeps (``record``)."""

    content: str
    record: dict[str, Any]


class Toolbox:
    def __init__(
        self,
        state: Any,
        principal: Principal,
        *,
        origin: str,
        approval_wait_s: float,
        output_chars: int,
        allowed_probes: set[str] | None = None,
        fleet_tags: bool = False,
        emit: Emit | None = None,
        recheck: Recheck | None = None,
        open_approvals: OpenApprovals | None = None,
    ) -> None:
        self.fleet = state.fleet
        self.approvals = state.approvals
        self.open_approvals = OpenApprovals(state) if open_approvals is None else open_approvals
        self.recheck = recheck
        self.principal = principal
        self.origin = origin
        self.approval_wait_s = approval_wait_s
        self.output_chars = output_chars
        self.result_chars = result_chars(output_chars)
        self.allowed_probes = allowed_probes
        self.emit = emit
        self.deadline: float | None = None  # monotonic; the conversation's time limit
        self.record_left = CONVERSATION_RECORD_CHARS  # for fan-outs' results in the transcript
        self.tools = [*TOOLS, FLEET_TOOL] if fleet_tags else list(TOOLS)

    async def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.emit is not None:
            await self.emit(kind, data)

    def _probe(self, arguments: dict[str, Any]) -> str:
        probe = str(arguments.get("probe") or "")
        if not probe:
            raise ValueError("the 'probe' argument is required")
        if self.allowed_probes is not None and probe not in self.allowed_probes:
            raise ValueError(f"probe {probe} is not in this conversation's targets")
        return probe

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        handler = getattr(self, f"_tool_{name}", None)
        if handler is None or name not in {tool["name"] for tool in self.tools}:
            return ToolOutcome(f"error: there is no tool named {name!r}", {"error": "unknown"})
        if self.recheck is not None:
            # The credential as it is now, not as it was when the conversation started. A
            # failure raises out of the conversation: nothing more runs under it.
            self.principal = await self.recheck()
        needed = TOOL_PERMISSIONS[name]
        if not self.principal.can(needed):
            text = f"not permitted: {name} needs the {needed.value!r} permission, which you lack"
            return ToolOutcome(f"error: {text}", {"error": text})
        if "_invalid_json" in arguments:
            return ToolOutcome("error: the arguments were not a JSON object", {"error": "json"})
        try:
            outcome: ToolOutcome = await handler(arguments)
        except AppError as exc:
            outcome = ToolOutcome(f"error: {exc.message}", {"error": exc.message})
        except (ValueError, TypeError) as exc:
            outcome = ToolOutcome(f"error: {exc}", {"error": str(exc)})
        return outcome

    # ---- commands ------------------------------------------------------------------------

    def _command_view(self, row: Any) -> dict[str, Any]:
        return command_view(row, self.output_chars)

    def _record_fan_out(self, ended: dict[str, Any]) -> dict[str, Any]:
        """``fan_out_record`` within what is left of the conversation's room for them."""
        room = min(max(FAN_OUT_RECORD_CHARS, 2 * self.result_chars), self.record_left)
        record = fan_out_record(ended, self.output_chars, room)
        self.record_left -= min(self.record_left, len(json.dumps(record["results"])))
        return record

    def _fan_out_text(self, decision: str, approval: dict[str, Any], ended: dict[str, Any]) -> str:
        """What the model is shown of a fan-out: a count of outcomes first, then every probe
        with an equal share of one result's room, so a large tag shows each probe's start
        rather than the first probes whole and the rest cut off."""
        count = max(1, len(ended))  # none where an approval ended undispatched
        room = self.result_chars - FAN_OUT_FIELDS_CHARS * (count + 1)
        share = max(FAN_OUT_MIN_STREAM_CHARS, min(self.output_chars, room // (2 * count)))
        results = {probe: probe_view(value, share) for probe, value in ended.items()}
        outcomes = Counter(_outcome(view) for view in results.values())
        shown = {"decision": decision, **approval, "probes": len(results)}
        return json.dumps({**shown, "outcomes": dict(outcomes), "results": results})

    async def _tool_run_command(self, arguments: dict[str, Any]) -> ToolOutcome:
        probe_id = self._probe(arguments)
        request = CommandRequest(
            command=str(arguments.get("command") or ""),
            args=[str(a) for a in arguments.get("args") or []],
            shell=bool(arguments.get("shell", False)),
        )
        record: dict[str, Any] = {"probe": probe_id, "command": request.command}
        if request.args:
            record["args"] = request.args
        try:
            verdict, row = await self.fleet.commands.run(
                principal=self.principal,
                probe_id=probe_id,
                request=request,
                mode="wait",
                origin=self.origin,
                reason=str(arguments.get("reason") or "")[:500],
            )
        except AppError as exc:
            record.update(decision="deny", error=exc.message, rationale=exc.details)
            await self._emit("command_denied", record)
            return ToolOutcome(f"refused by policy: {exc.message}", record)
        record["decision"] = verdict.decision
        if row is None:
            return await self._await_approval(verdict.approval, probe_id, request, record)
        record["result"] = self._command_view(row)
        await self._emit("command_result", record)
        return ToolOutcome(json.dumps(record["result"]), record)

    async def _await_approval(
        self, approval: Any, probe_id: str, request: CommandRequest, record: dict[str, Any]
    ) -> ToolOutcome:
        async with self._holding(approval):
            record["approval"] = {"id": approval.id, "rationale": approval.rationale}
            await self._emit("approval_pending", record)
            decided = await self._wait(approval.id)
        record["approval"]["status"] = decided.status
        if decided.status != "dispatched":
            await self._emit("approval_decided", record)
            reasons = "; ".join(d.reason for d in decided.decisions if d.reason)
            text = f"the approval {approval.id} ended as {decided.status}" + (
                f": {reasons}" if reasons else ""
            )
            if decided.status == "cancelled":
                text = f"nobody decided on approval {approval.id} in time; it was cancelled"
            return ToolOutcome(text + ". The command did not run.", record)
        row, error = await self.fleet.commands.approved_result(
            decided, probe_id, request.timeout_s + 30
        )
        if row is None:
            record["error"] = error
            return ToolOutcome(f"approved, but it could not run: {error}", record)
        record["result"] = self._command_view(row)
        await self._emit("command_result", record)
        return ToolOutcome(json.dumps(record["result"]), record)

    @asynccontextmanager
    async def _holding(self, approval: Any) -> AsyncIterator[None]:
        """From the moment a command's approval exists until its decision is read: any error
        or cancellation on the way (the client gone, its socket closed, the server stopping)
        cancels the approval before it propagates, so it cannot run with nobody waiting."""
        if approval is None:
            yield
            return
        self.open_approvals.hold(approval.id, self.principal)
        try:
            yield
        except BaseException:
            await self.open_approvals.abandon(approval.id, ENDED)
            raise
        finally:
            self.open_approvals.release(approval.id)

    async def _wait(self, approval_id: str) -> Any:
        """Wait for the decision within the conversation's limits. An approval nobody decided
        in time is cancelled, so it cannot run later behind the conversation's back."""
        wait_s = self.approval_wait_s
        if self.deadline is not None:
            wait_s = max(0.0, min(wait_s, self.deadline - time.monotonic()))
        decided = await self.approvals.wait(approval_id, wait_s)
        if decided.status == "pending":
            try:
                decided = await self.approvals.cancel(
                    approval_id, self.principal, "the conversation stopped waiting"
                )
            except AppError:  # decided in the meantime
                decided = await self.approvals.wait(approval_id, 5.0)
        return decided

    async def _tool_run_on_tag(self, arguments: dict[str, Any]) -> ToolOutcome:
        tag = str(arguments.get("tag") or "")
        probes = await self.fleet.registry.rows(tag=tag)
        if not tag or not probes:
            raise ValueError(f"no probe has the tag {tag!r}")
        if self.allowed_probes is not None and any(p.id not in self.allowed_probes for p in probes):
            raise ValueError(f"the tag {tag!r} reaches probes outside this conversation")
        request = CommandRequest(
            command=str(arguments.get("command") or ""),
            args=[str(a) for a in arguments.get("args") or []],
            shell=bool(arguments.get("shell", False)),
        )
        record: dict[str, Any] = {"tag": tag, "command": request.command}
        verdict, outcome = await self.fleet.commands.fan_out(
            principal=self.principal,
            tag=tag,
            request=request,
            probes=probes,
            origin="fleet_chat",
            reason=str(arguments.get("reason") or "")[:500],
        )
        record["decision"] = verdict.decision
        approval = verdict.approval if verdict.decision == "queue" else None
        ended: dict[str, Any] = {}  # per probe: its command's row, or a dict of its error
        decided = None
        async with self._holding(approval):
            for item in outcome.results:
                if item.result is not None:
                    ended[item.probe_id] = await self.fleet.commands.get(item.result.request_id)
                else:
                    ended[item.probe_id] = {"error": item.error}
            if approval is not None:
                record["approval"] = {"id": approval.id, "rationale": approval.rationale}
                await self._emit("approval_pending", record)
                decided = await self._wait(approval.id)
        if decided is not None:
            record["approval"]["status"] = decided.status
            if decided.status == "dispatched":
                for probe_id, request_id in (decided.result or {}).get("request_ids", {}).items():
                    ended[probe_id] = await self.fleet.commands.wait_finished(
                        request_id, request.timeout_s + 30
                    )
                for probe_id, error in (decided.result or {}).get("errors", {}).items():
                    ended[probe_id] = {"error": error}
        record.update(self._record_fan_out(ended))
        await self._emit("command_result", record)
        text = self._fan_out_text(verdict.decision, record.get("approval", {}), ended)
        return ToolOutcome(text, record)

    async def _tool_get_command_result(self, arguments: dict[str, Any]) -> ToolOutcome:
        row = await self.fleet.commands.get(str(arguments.get("request_id") or ""))
        if self.allowed_probes is not None and row.probe_id not in self.allowed_probes:
            raise ValueError("that command ran on a probe outside this conversation")
        view = self._command_view(row)
        return ToolOutcome(json.dumps(view), {"request_id": row.id, "status": row.status})

    # ---- reads ---------------------------------------------------------------------------

    async def _file(self, probe_id: str, request: dict[str, Any]) -> ToolOutcome:
        # The probe reads (or finds) no more than the model is shown, and says whether it
        # left some out, rather than send up to a MiB for all but the start to be dropped.
        asked = {**request, "max_bytes": self.output_chars}
        data = await self.fleet.actions.file_op(probe_id, asked, actor=self.principal.actor)
        text = data if isinstance(data, str) else json.dumps(data, default=str)
        return ToolOutcome(text, {"probe": probe_id, **request})

    async def _tool_read_file(self, arguments: dict[str, Any]) -> ToolOutcome:
        probe_id = self._probe(arguments)
        return await self._file(probe_id, {"op": "read", "path": str(arguments.get("path"))})

    async def _tool_search_files(self, arguments: dict[str, Any]) -> ToolOutcome:
        probe_id = self._probe(arguments)
        request = {
            "op": "search",
            "path": str(arguments.get("path")),
            "pattern": str(arguments.get("pattern")),
        }
        return await self._file(probe_id, request)

    async def _tool_get_inventory(self, arguments: dict[str, Any]) -> ToolOutcome:
        probe_id = self._probe(arguments)
        detail = await self.fleet.registry.detail(probe_id)
        text = json.dumps(detail.inventory, default=str)
        return ToolOutcome(truncate(text, self.output_chars), {"probe": probe_id})

    async def _tool_get_health(self, arguments: dict[str, Any]) -> ToolOutcome:
        probe_id = self._probe(arguments)
        health = await self.fleet.registry.health(probe_id)
        return ToolOutcome(health.model_dump_json(), {"probe": probe_id})

    async def _tool_list_probes(self, arguments: dict[str, Any]) -> ToolOutcome:
        tag = arguments.get("tag") or None
        probes = await self.fleet.registry.list(tag=str(tag) if tag else None)
        rows = [
            {"id": p.id, "hostname": p.hostname, "status": p.status, "tags": p.tags}
            for p in probes
            if self.allowed_probes is None or p.id in self.allowed_probes
        ]
        shown: dict[str, Any] = {"total": len(rows), "probes": rows[:MAX_LISTED_PROBES]}
        if len(rows) > MAX_LISTED_PROBES:
            shown["not_listed"] = (
                f"{len(rows) - MAX_LISTED_PROBES} more, not listed; give a tag to list fewer"
            )
        return ToolOutcome(json.dumps(shown), {"tag": tag, "count": len(rows)})


def _outcome(view: dict[str, Any]) -> str:
    """How one probe's command ended, to count a fan-out's outcomes by."""
    if "status" not in view:
        return "error"
    if view["exit_code"] is None:
        return str(view["status"])
    return f"{view['status']}, exit {view['exit_code']}"
