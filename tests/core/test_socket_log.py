"""The fleet socket's warnings about a malformed probe message: the error text is cut to a
log line's length, and the cut must not leave the start of a secret."""

from __future__ import annotations

import json
from typing import cast

import pytest
from pydantic import ValidationError

from legator.core.logging import configure_logging
from legator.fleet.protocol import Envelope
from legator.fleet.socket import _handle, _PolicyPusher, _quiet
from legator.fleet.wing import Fleet

SECRET = "lgk_" + "ab12" * 16


def _lines(capsys: pytest.CaptureFixture[str], event: str) -> list[dict[str, str]]:
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [line for line in lines if line["event"] == event]


def _message_cut_inside_the_secret() -> str:
    """A probe message whose validation error, cut at 200 characters, ends 6 characters into
    the secret's random part: too short for the key's pattern, long enough to leak."""
    for pad in range(1, 200):
        body = {"id": "i", "type": "t", "ts": "x", "z" * pad: SECRET}
        try:
            Envelope.model_validate(body)
        except ValidationError as exc:
            at = str(exc).find(SECRET[:10])
            if at >= 0 and 200 - at == len("lgk_") + 6:
                return json.dumps(body)
    raise AssertionError("no padding puts the cut inside the secret")


async def test_a_malformed_message_logs_no_part_of_a_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    capsys.readouterr()
    text = _message_cut_inside_the_secret()
    # The malformed message is refused before the fleet or the pusher is touched.
    await _handle(cast(Fleet, None), "probe-1", text, cast(_PolicyPusher, None))
    (line,) = _lines(capsys, "malformed probe message")
    assert SECRET[:8] not in line["error"] and "ab12ab" not in line["error"], line["error"]
    assert line["error"].endswith("…[clipped]")


async def test_a_failed_policy_push_logs_no_part_of_a_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    capsys.readouterr()
    before = "x " * 93 + "key "  # a cut at 200 would leave lgk_ and 6 of its characters

    async def push() -> None:
        raise RuntimeError(before + SECRET + " refused")

    await _quiet(push())
    (line,) = _lines(capsys, "policy push on connect failed")
    assert "ab12ab" not in line["error"] and line["error"].endswith("…[clipped]"), line
