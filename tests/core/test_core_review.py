"""Core review findings: each test shows a hole that was open, and stays as its guard."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
import time
import zipfile
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from legator.core.audit import service as audit_service
from legator.core.audit.models import AuditEvent
from legator.core.audit.sanitiser import REDACTED, sanitise, sanitise_text
from legator.core.audit.service import AuditService
from legator.core.config import ConfigError, Settings, load_settings
from legator.core.db import Database, retention, utcnow
from legator.core.db.migrate import upgrade
from legator.core.http import protocol
from legator.core.logging import configure_logging, get_logger
from tests.support import LiveServer


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"a:{seq}".encode()).decode().rstrip("=")


def test_an_out_of_range_cursor_is_a_bad_request_not_a_500(api: httpx.Client) -> None:
    for seq in (2**63, 10**30, -(2**63) - 1):
        response = api.get("/api/v1/audit", params={"cursor": _cursor(seq)})
        assert response.status_code == 400, (seq, response.text)
        assert response.json()["error"]["code"] == "bad_request"


def test_an_out_of_range_purge_age_is_a_bad_request_not_a_500(api: httpx.Client) -> None:
    for older_than in ("9999999999d", "99999999999999999999h", "999999999d"):
        response = api.delete("/api/v1/audit", params={"older_than": older_than})
        assert response.status_code == 400, (older_than, response.text)
        assert "older_than" in response.json()["error"]["message"]


SECRET = "hunter2-S3cret"


@pytest.mark.parametrize(
    "text",
    [
        # Python's repr of a dict, as in an exception message or a traceback.
        f"bad settings {{'password': '{SECRET}', 'user': 'app'}}",
        f"{{'db_password': {SECRET!r}}}",
        # JSON inside a JSON string (a tool call's arguments, a provider's error body).
        json.dumps({"arguments": json.dumps({"password": SECRET})}),
        json.dumps({"arguments": json.dumps({"api_key": f"{SECRET} with spaces"})}),
    ],
)
def test_quoted_secret_fields_in_text_are_redacted(text: str) -> None:
    cleaned = sanitise_text(text)
    assert SECRET not in cleaned, cleaned
    assert REDACTED in cleaned


def test_a_repr_in_an_exception_does_not_reach_the_log(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    capsys.readouterr()
    try:
        raise ValueError(f"cannot connect with {{'host': 'db', 'password': '{SECRET}'}}")
    except ValueError as exc:
        get_logger("legator.http").error("unhandled error", path="/x", exc_info=exc)
    out = capsys.readouterr().out
    assert "ValueError" in out and SECRET not in out


@pytest.mark.parametrize(
    "name", ["PGPASSWORD", "MYSQL_ROOTPASSWORD", "adminpasswd", "DBPassPhrase", "x-Pass-Word"]
)
def test_run_together_secret_names_are_redacted_as_keys(name: str) -> None:
    # The text form of the same field already was: the two layers must agree.
    assert SECRET not in sanitise_text(json.dumps({name: SECRET}))
    assert sanitise({"env": {name: SECRET}}) == {"env": {name: REDACTED}}


def test_ordinary_names_stay() -> None:
    assert sanitise({"input_tokens": 5, "secrets": ["db"], "passes": 2}) == {
        "input_tokens": 5,
        "secrets": ["db"],
        "passes": 2,
    }


def test_a_purge_never_deletes_an_event_younger_than_its_cutoff(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose clock runs a year behind stamps its events long ago: a purge of what is
    older than 90 days must still keep the events of yesterday written before them."""
    monkeypatch.setattr(retention, "PRUNE_PAUSE_S", 0)
    skewed = utcnow() - timedelta(days=365)

    async def scenario() -> None:
        db = Database(Settings(database_url=db_url).effective_database_url)
        await upgrade(db)
        audit = AuditService(db, b"review-chain-key-0123456789")
        try:
            with monkeypatch.context() as clock:
                clock.setattr(audit_service, "utcnow", lambda: skewed)
                await audit.log(actor="a", action="test.old")
            await audit.log(actor="a", action="test.recent")
            with monkeypatch.context() as clock:
                clock.setattr(audit_service, "utcnow", lambda: skewed)
                await audit.log(actor="a", action="test.skewed")
            cutoff = utcnow() - timedelta(days=90)
            for batches in (False, True):
                if batches:
                    await audit.purge_in_batches(cutoff, actor="t")
                else:
                    await audit.purge(cutoff, actor="t")
                async with db.session() as session:
                    actions = list((await session.scalars(select(AuditEvent.action))).all())
                assert "test.recent" in actions, actions
                assert "test.old" not in actions
                assert (await audit.verify()).ok
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_an_action_prefix_is_matched_literally(api: httpx.Client, server: LiveServer) -> None:
    assert server.core is not None
    for action in ("api_key.probe", "apiXkey.other", "api%key.other"):
        server.call(server.core.audit.log(actor="admin", action=action))
    for prefix in ("api_key.*", "api%*"):
        events = api.get("/api/v1/audit", params={"action": prefix}).json()["events"]
        actions = {e["action"] for e in events}
        assert actions and all(a.startswith(prefix[:-1]) for a in actions), (prefix, actions)


def test_a_secret_given_as_the_next_argument_is_redacted() -> None:
    # What fleet.command.dispatch records: the command line, whole or split into arguments.
    details = {
        "command": f"mysql -u root --password {SECRET} -e 'select 1'",
        "args": ["-u", "root", "--password", SECRET, "--api-token", SECRET, "db"],
    }
    cleaned = sanitise(details)
    assert SECRET not in repr(cleaned), cleaned
    assert cleaned["args"][:3] == ["-u", "root", "--password"] and cleaned["args"][-1] == "db"
    # A flag that takes no value keeps the next one.
    assert sanitise(["--password-stdin", "-u", "bob"]) == ["--password-stdin", "-u", "bob"]
    assert sanitise_text("docker login --password-stdin -u bob") == (
        "docker login --password-stdin -u bob"
    )


def _trickle(server: LiveServer, head: bytes, body: bytes, wait_s: float) -> bytes:
    """Send ``head`` and the start of ``body``, then nothing more: what comes back before the
    server closes the connection (or ``wait_s`` passes)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as conn:
        conn.sendall(head + body)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except TimeoutError:
            return received + b"<still open>"
        return received


@pytest.mark.parametrize("chunked", [False, True])
def test_a_trickled_body_is_cut_off(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, chunked: bool
) -> None:
    monkeypatch.setattr(protocol, "BODY_WINDOW_S", 0.5, raising=False)
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: 100000\r\n"
    head = (
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + framing
        + b"\r\n"
    )
    started = time.monotonic()
    answer = _trickle(server, head, b'5\r\n{"a":\r\n' if chunked else b'{"a":', wait_s=30)
    assert not answer.endswith(b"<still open>"), answer
    assert time.monotonic() - started < 8  # the 0.5 s window, not the 10 s default
    # A body that arrives whole is unaffected, however slow the window.
    whole = b'{"username": "nobody", "password": "wrong-password"}'
    plain = (
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(whole)).encode() + b"\r\n\r\n"
    )
    assert _trickle(server, plain, whole, wait_s=8).startswith(b"HTTP/1.1 401 ")


def test_a_time_beyond_the_calendar_in_utc_is_a_bad_request_not_a_500(api: httpx.Client) -> None:
    for name, value in (
        ("since", "0001-01-01T00:00:00+14:00"),
        ("until", "9999-12-31T23:59:59-14:00"),
    ):
        for path in ("/api/v1/audit", "/api/v1/audit/export"):
            response = api.get(path, params={name: value})
            assert response.status_code == 400, (path, name, response.text)
            assert name in response.json()["error"]["message"]
    response = api.delete("/api/v1/audit", params={"older_than": "0001-01-01T00:00:00+14:00"})
    assert response.status_code == 400, response.text
    assert "older_than" in response.json()["error"]["message"]


def test_the_bundle_report_covers_exactly_the_events_it_holds(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event written while the bundle is made (the server keeps running) must not be
    in the chain report without being in events.ndjson."""

    async def scenario() -> None:
        db = Database(Settings(database_url=db_url).effective_database_url)
        await upgrade(db)
        audit = AuditService(db, b"review-chain-key-0123456789")
        try:
            for i in range(3):
                await audit.log(actor="a", action="test.event", target=str(i))
            real_iterate = audit.iterate
            calls = 0

            async def iterate_then_write(flt: audit_service.AuditFilter, batch: int = 500):  # type: ignore[no-untyped-def]
                nonlocal calls
                calls += 1
                async for event in real_iterate(flt, batch):
                    yield event
                if calls == 1:  # another request's event, just after the export's last page
                    await audit.log(actor="a", action="test.meanwhile")

            monkeypatch.setattr(audit, "iterate", iterate_then_write)
            buffer = io.BytesIO()
            count = await audit.bundle(buffer)
            with zipfile.ZipFile(buffer) as archive:
                lines = archive.read("events.ndjson").splitlines()
                report = json.loads(archive.read("verification.json"))
            assert len(lines) == count == report["checked"], (count, report)
            assert report["ok"] is True
            # A broken chain ends the check early, but the bundle still holds every event.
            async with db.write() as session:
                await session.execute(
                    update(AuditEvent).where(AuditEvent.target == "0").values(actor="b")
                )
            buffer = io.BytesIO()
            count = await audit.bundle(buffer)
            with zipfile.ZipFile(buffer) as archive:
                lines = archive.read("events.ndjson").splitlines()
                report = json.loads(archive.read("verification.json"))
            assert len(lines) == count == 4 and report["ok"] is False, (count, report)
        finally:
            await db.dispose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pa55word@db:54x2/legator",  # a port that is no number
        "postgresql://app:pa55word@db:99999/legator",
        "sqlite://legator.db",  # two slashes: a host, no path
    ],
)
def test_a_database_url_that_cannot_work_names_the_variable(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(database_url=url)
    message = str(caught.value)
    assert message.startswith("LEGATOR_DATABASE_URL: "), message
    assert "pa55word" not in message


def test_a_database_url_that_works_is_kept() -> None:
    for url in ("sqlite://", "sqlite:////tmp/x.db", "postgresql://u:pa/ss@db:5432/x"):
        assert load_settings(database_url=url).database_url


_UPGRADE = """
import asyncio, sys
from legator.core.db import Database
from legator.core.db.migrate import upgrade
async def main():
    db = Database(sys.argv[1])
    try:
        await upgrade(db)
    finally:
        await db.dispose()
asyncio.run(main())
"""


@pytest.mark.postgres
def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    """Replicas started at once on a database behind head (a fresh one, or after an update)
    all come up: one migrates, the others wait for it and find nothing left to do."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADE, pg_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.strip().splitlines()[-1:]
