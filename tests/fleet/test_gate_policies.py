# ruff: noqa: S604  (shell=True marks a command line to classify; nothing is executed here)
"""The gate evaluates a command once per distinct policy among its targets, not per target,
and decides exactly as it did target by target."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

import legator.fleet.gate as gate_mod
from legator.core.audit.service import AuditService
from legator.core.auth.principal import Principal
from legator.fleet.approvals.schemas import ApprovalMode
from legator.fleet.approvals.service import ApprovalService
from legator.fleet.gate import Action, Gate, Target
from legator.fleet.policy import DIAGNOSE, OBSERVE, Policy, evaluate


class _Audit:
    async def log(self, **fields: Any) -> None:
        pass


PRINCIPAL = Principal(
    user_id="u1", username="op", role="operator", permissions=frozenset(), method="session"
)


def _targets() -> list[Target]:
    # 50 probes under two policies; equal policies built apart, as the service builds them.
    return [
        Target(
            f"prb-{index}",
            "diag" if index % 2 else "observe",
            Policy(level=DIAGNOSE if index % 2 else OBSERVE, block=("rm",)),
            ApprovalMode.NONE,
        )
        for index in range(50)
    ]


def test_one_evaluation_per_distinct_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Policy] = []

    def counting(policy: Policy, *args: Any, **kwargs: Any) -> Any:
        calls.append(policy)
        return evaluate(policy, *args, **kwargs)

    monkeypatch.setattr(gate_mod, "evaluate", counting)
    gate = Gate(
        cast(ApprovalService, object()), cast(AuditService, _Audit()), model_network_approval=True
    )
    action = Action(kind="fleet.command", origin="fanout", command="ss -tlnp | head", shell=True)
    result = asyncio.run(gate.check(action, _targets(), PRINCIPAL))
    assert len(calls) == 2, f"{len(calls)} evaluations for 2 distinct policies"
    # The same decision as target by target: observe probes refuse ss (diagnose).
    assert result.decision == "allow"
    assert result.allowed_targets == [f"prb-{i}" for i in range(50) if i % 2]
    assert sorted(result.rationale["denied"]) == sorted(f"prb-{i}" for i in range(50) if not i % 2)
    reason = result.rationale["denied"]["prb-0"]
    assert reason == "policy observe: command needs level diagnose, policy allows up to observe"
