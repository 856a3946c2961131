"""What the probe says about a message it cannot read: sanitised, and marked where cut."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import legator.fleet.protocol as p
from legator.core.audit.sanitiser import CLIP_MARK
from legator.probe.agent import Agent
from legator.probe.config import ProbeConfig

TOKEN = "Bearer " + "Zq7" * 20


def _agent(tmp_path: Path, sent: list[Any]) -> Agent:
    config = ProbeConfig(
        server="http://127.0.0.1:1", probe_id="p1", api_key="k", signing_key="0" * 64
    )
    agent = Agent(config, tmp_path / "probe.yaml")

    async def record(type_: str, payload: Any, *, keep: bool = False) -> None:
        sent.append(payload)

    agent._send = record  # type: ignore[method-assign]
    return agent


@pytest.mark.parametrize(
    "message",
    [
        # an envelope that does not validate: pydantic quotes the value
        json.dumps({"id": "m1", "type": {"authorization": TOKEN}, "ts": 1, "payload": {}}),
        # a signed type whose payload does not validate (after the signature would fail,
        # so: an unknown field value in a type the probe never takes)
        json.dumps({"id": "m2", "type": [TOKEN] * 30, "ts": 1, "payload": {}}),
    ],
    ids=["envelope", "long"],
)
def test_unreadable_message_is_sanitised_and_marked_when_cut(tmp_path: Path, message: str) -> None:
    sent: list[Any] = []
    asyncio.run(_agent(tmp_path, sent)._on_message(message))
    (result,) = sent
    assert isinstance(result, p.CommandResult) and result.reason == "malformed"
    assert result.error is not None
    assert "Zq7Zq7" not in result.error, result.error
    assert result.error.startswith("unreadable message: ")
    assert result.error.endswith(CLIP_MARK), result.error
