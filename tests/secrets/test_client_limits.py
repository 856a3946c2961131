"""What the secrets client reads from legerd or the control plane is capped while it arrives,
and each answer has a deadline in all: a hostile or broken server (or a proxy in front of it)
that floods gets one error line naming the path and the limit, with leger's memory small, and
one that drips a byte at a time is given up on. The servers are stand-ins (``hostile_plane``'s,
answering setec's POST calls too) because the real ones never misbehave so."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from legator.core import bounded_http
from legator.secrets.client import Client, Unavailable
from tests.deploy.helpers import bare_leger_env
from tests.deploy.hostile_plane import JSON, Plan, _handler, hostile_plane
from tests.deploy.test_leger_limits import run_measured
from tests.secrets.conftest import LegerdThread
from tests.support import one_line_error

FLOOD = 256 * 1024 * 1024
# `leger secrets` peaks near 110 MiB here, plus twice the largest cap (16 MiB, a list) while it
# reads; one that holds the flood needs at least FLOOD.
MAX_RSS = 192 * 1024 * 1024
# What the stand-in can write before leger hangs up: the largest cap plus the socket buffers.
MAX_SENT = 48 * 1024 * 1024
API_KEY = "lgk_" + "0" * 64


def _setec_handler(plan: Plan) -> type[BaseHTTPRequestHandler]:
    """``hostile_plane``'s handler, also flooding a POST to ``plan.flood_path`` (every setec
    call is a POST), with an empty list and a user for the calls ``sync`` makes first."""

    class Handler(_handler(plan)):  # type: ignore[misc]
        def do_GET(self) -> None:
            if self.path == "/api/v1/me" != plan.flood_path:
                self._answer(json.dumps({"username": "alice"}).encode(), JSON)
            else:
                super().do_GET()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            with plan.lock:
                plan.paths.append(self.path)
            if self.path == plan.flood_path:
                self._flood()
            elif self.path.endswith("/list"):
                self._answer(b"[]", JSON)
            else:
                self._answer(b'{"error": {"message": "not found"}}', JSON, 404)

    return Handler


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **bare_leger_env(tmp_path),
        "LEGER_SECRETS_SOCKET": str(tmp_path / "no-legerd.sock"),
        "LEGATOR_API_KEY": API_KEY,
    }


LOCAL = ("secrets", "--server", "{url}")
SYNC = ("secrets", "sync", "--control-plane", "{url}")


@pytest.mark.parametrize(
    ("plan", "args", "message"),
    [
        # legerd's list: the largest answer a call may have.
        (
            Plan(FLOOD, "/api/list"),
            (*LOCAL, "list"),
            "POST /api/list: the answer is over the 16 MiB accepted",
        ),
        # One value (at most 1 MiB in legerd, base64 in JSON).
        (
            Plan(FLOOD, "/api/get"),
            (*LOCAL, "get", "app/key"),
            "POST /api/get: the answer is over the 4 MiB accepted",
        ),
        # `sync`'s first question to the control plane.
        (
            Plan(FLOOD, "/api/v1/me"),
            SYNC,
            "GET /api/v1/me: the answer is over the 4 MiB accepted",
        ),
        # The control plane's list of secrets.
        (
            Plan(FLOOD, "/api/v1/secrets/list"),
            SYNC,
            "POST /api/v1/secrets/list: the answer is over the 16 MiB accepted",
        ),
        # An error page that never ends: only its start is read, for the message.
        (
            Plan(FLOOD, "/api/list", status=500),
            (*LOCAL, "list"),
            'list: {"pad": "xxx',
        ),
    ],
    ids=["list", "get", "sync-me", "sync-list", "error"],
)
def test_a_flood_is_refused_while_it_arrives(
    env: dict[str, str], plan: Plan, args: tuple[str, ...], message: str
) -> None:
    with hostile_plane(plan, _setec_handler(plan)) as url:
        run = run_measured(env, *(arg.format(url=url) for arg in args))
    assert run.peak_rss < MAX_RSS, f"leger peaked at {run.peak_rss >> 20} MiB"
    assert plan.sent < MAX_SENT, f"leger read {plan.sent >> 20} MiB of the flood"
    line = one_line_error(run.result, 1)
    assert message in line, line
    assert len(line) < 600


@pytest.mark.parametrize(
    ("path", "ask"),
    [
        ("/api/list", lambda url: Client(url).list()),
        ("/api/get", lambda url: Client(url).get_if_changed("app/key", 1)),
        ("/api/v1/me", lambda url: Client(url, api_key=API_KEY, prefix="/api/v1/secrets").whoami()),
    ],
    ids=["list", "get", "whoami"],
)
def test_a_dripping_answer_is_given_up_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch, path: str, ask: object
) -> None:
    """A byte every 0.2 s never trips the 10 s wait for the next bytes: legerd or a proxy
    could hold `leger secrets`, a deploy or a program's poller forever. Each call now has
    the deadline in all (``REQUEST_DEADLINE``, 300 s; 2 s here), and missing it is
    ``Unavailable`` as a timeout is (a ``Store`` serves its cached copy)."""
    monkeypatch.setattr(bounded_http, "REQUEST_DEADLINE", 2.0)
    plan = Plan(100, path, drip=0.2)  # 20 s in all
    with hostile_plane(plan, _setec_handler(plan)) as url:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            ask(url)  # type: ignore[operator]
        took = time.monotonic() - started
    assert f"{path}: no complete answer within 2 s" in str(caught.value)
    assert took < 15, f"gave up after {took:.1f} s"  # all 100 bytes take 20 s


def test_the_largest_value_still_arrives(dev_legerd: LegerdThread) -> None:
    """The cap leaves room for what legerd may hold: a 1 MiB value, base64 in JSON."""
    value = bytes(range(256)) * 4096
    with Client(dev_legerd.url) as client:
        client.put("big", value)
        assert client.get("big") == (value, 1)
        assert client.get_if_changed("big", 1) is None
        assert [info.name for info in client.list()] == ["big"]


@pytest.mark.parametrize(
    ("args", "path"),
    [
        ((*LOCAL, "list"), "/api/list"),
        ((*LOCAL, "get", "app/key"), "/api/get"),
        ((*LOCAL, "info", "app/key"), "/api/info"),
        (SYNC, "/api/v1/me"),
        (SYNC, "/api/v1/secrets/list"),
    ],
    ids=["list", "get", "info", "sync-me", "sync-list"],
)
def test_an_answer_of_another_shape_is_one_error_line(
    env: dict[str, str], args: tuple[str, ...], path: str
) -> None:
    """JSON that is not the call's answer (here ``{"pad": "x…"}``, as from a proxy's own
    API) ended `leger secrets` in a traceback (KeyError, TypeError)."""
    plan = Plan(10, path)
    with hostile_plane(plan, _setec_handler(plan)) as url:
        result = run_measured(env, *(arg.format(url=url) for arg in args)).result
    line = one_line_error(result, 1)
    assert line.startswith(f"error: {url}: ") and f" {path}: not the answer" in line, line
