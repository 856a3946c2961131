"""Reaching into the running control plane for the tests that play a hostile server."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from legator.core.db import new_id, utcnow
from legator.fleet.models import Command
from legator.fleet.protocol import Envelope
from legator.fleet.wing import Fleet
from tests.support import LiveServer


def fleet(server: LiveServer) -> Fleet:
    assert server.app is not None
    return server.app.state.fleet  # type: ignore[no-any-return]


def record_command(server: LiveServer, probe_id: str, command: str) -> str:
    """A command row as dispatch would leave it, so the probe's answer has a home."""

    async def go() -> str:
        row = Command(
            id=new_id(),
            probe_id=probe_id,
            command=command,
            args=[],
            shell=False,
            level="observe",
            timeout_s=10,
            mode="dispatch",
            status="dispatched",
            requested_by="test",
            stdout="",
            stderr="",
            deadline_at=utcnow() + timedelta(seconds=60),
        )
        async with server.core.db.write() as session:  # type: ignore[union-attr]
            session.add(row)
        return row.id

    return server.call(go())


def probe_key(server: LiveServer, probe_id: str) -> str:
    """The signing key of the probe's current enrolment, as the control plane signs with it."""
    return server.call(fleet(server).hub.current_key(probe_id))  # type: ignore[no-any-return]


def send_raw(server: LiveServer, probe_id: str, envelope: Envelope) -> None:
    server.call(fleet(server).hub.send_envelope(probe_id, envelope))


def set_probe(server: LiveServer, probe_id: str, **values: Any) -> None:
    from sqlalchemy import update

    from legator.fleet.models import Probe

    async def go() -> None:
        async with server.core.db.write() as session:  # type: ignore[union-attr]
            await session.execute(update(Probe).where(Probe.id == probe_id).values(**values))

    server.call(go())
