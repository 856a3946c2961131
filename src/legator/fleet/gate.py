"""The one gate every path goes through before anything runs on a host.

classify (level and risk) → policy of each target → approval mode → allow, queue or deny,
with a rationale that is returned to the caller, sent in headers and written to the audit
trail. REST commands, fan-out by tag, jobs, chat, fleet chat, the task runner, MCP and deploy
all call :meth:`Gate.check`; a test walks the code to make sure nothing dispatches around it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from legator.core.audit.service import AuditService
from legator.core.auth.principal import Principal
from legator.core.context import current_request_id
from legator.fleet.approvals.schemas import ApprovalMode, ApprovalOut
from legator.fleet.approvals.service import ApprovalService
from legator.fleet.policy import (
    REMEDIATE,
    Decision,
    Policy,
    evaluate,
    reaches_network,
    strongest,
)
from legator.fleet.risk import CRITICAL, HIGH, classify_risk

Outcome = Literal["allow", "queue", "deny"]
# Where a model, not a person, wrote the command.
MODEL_ORIGINS = frozenset({"chat", "fleet_chat", "task", "mcp"})
MODEL_NETWORK = "written by a model and can reach another host"
_MODE_ORDER = [
    ApprovalMode.NONE,
    ApprovalMode.MUTATION_GATE,
    ApprovalMode.EVERY_ACTION,
    ApprovalMode.TWO_PERSON,
]
THRESHOLDS = {
    ApprovalMode.NONE.value: "never queued",
    ApprovalMode.MUTATION_GATE.value: "queued at level remediate or risk high/critical",
    ApprovalMode.EVERY_ACTION.value: "every action is queued",
    ApprovalMode.TWO_PERSON.value: (
        "queued at level remediate or risk high/critical; high and critical need two approvers"
    ),
}


@dataclass(frozen=True)
class Target:
    """A host the action would run on, with the policy that governs it."""

    probe_id: str
    policy_id: str
    policy: Policy
    approval_mode: ApprovalMode = ApprovalMode.MUTATION_GATE


@dataclass(frozen=True)
class Action:
    """What someone wants to run, and what the dispatcher needs to run it once allowed."""

    kind: str  # the approval dispatcher that runs it (e.g. "command")
    origin: str  # rest, fanout, job, chat, fleet_chat, task, mcp, deploy
    command: str
    args: Sequence[str] = ()
    shell: bool = False
    level: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return " ".join([self.command, *self.args])

    @property
    def environment(self) -> dict[str, str]:
        """The variables the command will run with: ``env``, and those of the request it
        carries for its dispatcher (``payload["request"]["env"]``), which is what runs."""
        request = self.payload.get("request")
        carried = request.get("env") if isinstance(request, Mapping) else None
        return {**(carried if isinstance(carried, Mapping) else {}), **self.env}


@dataclass(frozen=True)
class GateResult:
    decision: Outcome
    rationale: dict[str, Any]
    allowed_targets: list[str]
    approval: ApprovalOut | None = None
    # An "allow" the caller records atomically with the dispatch (``check(record_allow=False)``)
    decision_audit: dict[str, Any] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {
            "X-Legator-Policy-Decision": self.decision,
            "X-Legator-Risk-Tier": str(self.rationale["risk"]),
        }


def strictest(modes: Sequence[ApprovalMode]) -> ApprovalMode:
    return max(modes, key=_MODE_ORDER.index, default=ApprovalMode.MUTATION_GATE)


def needs_approval(mode: ApprovalMode, level: str, risk: str) -> list[str]:
    """The reasons this action must wait for a human (empty: it need not)."""
    if mode is ApprovalMode.NONE:
        return []
    if mode is ApprovalMode.EVERY_ACTION:
        return ["mode every_action"]
    drivers = []
    if level == REMEDIATE:
        drivers.append("level remediate")
    if risk in (HIGH, CRITICAL):
        drivers.append(f"risk {risk}")
    return drivers


class Gate:
    def __init__(
        self, approvals: ApprovalService, audit: AuditService, *, model_network_approval: bool
    ) -> None:
        self.approvals = approvals
        self.audit = audit
        # A prompt-injected model could send off what it has read with a low-level command
        # (curl, nslookup, ping of a name carrying the data): a person sees those first.
        self.model_network_approval = model_network_approval

    async def check(
        self,
        action: Action,
        targets: Sequence[Target],
        principal: Principal,
        *,
        record_allow: bool = True,
    ) -> GateResult:
        """Decide, and write the decision to the audit trail. With ``record_allow=False`` an
        "allow" comes back unwritten in ``decision_audit`` for the caller to record in the
        same transaction as what it allowed (one write instead of two per command)."""
        risk = classify_risk(action.command, action.args, shell=action.shell)
        env = action.environment
        denied: dict[str, str] = {}
        allowed: list[Target] = []
        levels: list[str] = []
        # Probes under one policy share its verdict: a fan-out to a tag evaluates the command
        # once per distinct policy (each evaluation parses the line again), not per probe.
        verdicts: dict[Policy, Decision] = {}
        for target in targets:
            verdict = verdicts.get(target.policy)
            if verdict is None:
                verdict = verdicts[target.policy] = evaluate(
                    target.policy,
                    action.command,
                    action.args,
                    shell=action.shell,
                    requested=action.level,
                    env=env,
                )
            levels.append(verdict.required)
            if verdict.allowed:
                allowed.append(target)
            else:
                denied[target.probe_id] = f"policy {target.policy_id}: {verdict.reason}"
        level = strongest(levels) if levels else REMEDIATE
        mode = strictest([t.approval_mode for t in allowed])
        drivers = needs_approval(mode, level, risk) if allowed else []
        if allowed and mode is not ApprovalMode.NONE and self._model_networking(action):
            drivers.append(MODEL_NETWORK)
        decision: Outcome = "deny" if not allowed else ("queue" if drivers else "allow")
        rationale: dict[str, Any] = {
            "decision": decision,
            "origin": action.origin,
            "level": level,
            "risk": risk,
            "mode": mode.value,
            "threshold": THRESHOLDS[mode.value],
            "drivers": drivers if allowed else ["every target's policy refused it"],
            "policies": {t.probe_id: t.policy_id for t in targets},
            "targets": [t.probe_id for t in allowed],
            "denied": denied,
        }
        approval = None
        if decision == "queue":
            approval = await self.approvals.request(
                kind=action.kind,
                summary=action.summary,
                targets=[t.probe_id for t in allowed],
                mode=mode,
                risk=risk,
                level=level,
                rationale=rationale,
                payload={**action.payload, "targets": [t.probe_id for t in allowed]},
                requester=principal,
                reason=action.reason,
            )
            rationale["approval_id"] = approval.id
        audit = {
            "actor": principal.actor,
            "action": "gate.decision",
            "target": ",".join(t.probe_id for t in targets)[:480],
            "outcome": {"allow": "success", "queue": "success", "deny": "denied"}[decision],
            "details": {"command": action.summary, **rationale},
            "request_id": current_request_id(),
        }
        allowed_ids = [t.probe_id for t in allowed]
        if decision == "allow" and not record_allow:
            return GateResult(decision, rationale, allowed_ids, approval, decision_audit=audit)
        await self.audit.log(**audit)
        return GateResult(decision, rationale, allowed_ids, approval)

    def _model_networking(self, action: Action) -> bool:
        return (
            self.model_network_approval
            and action.origin in MODEL_ORIGINS
            and reaches_network(action.command, action.args, shell=action.shell)
        )
