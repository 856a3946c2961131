"""leger's errors against the control plane of `leger auth login`: out of reach or not the
control plane (one line, exit 1), a version it does not have (3, not found), a --source that
names nothing (2, usage). No Podman needed: all of it happens before anything is installed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from legator.deploy.client import Login, save_login
from tests.fake_proxy import closed_url, fake_proxy
from tests.support import LiveServer, live_server, one_line_error, run_cli


def log_in(env: dict[str, str], server: str, token: str = "lgk_" + "0" * 64) -> None:
    """What `leger auth login` stores."""
    login = Login(
        server=server,
        token=token,
        method="api_key",
        username="admin",
        key_id=None,
        expires_at=None,
        logged_in_at=datetime.now(UTC).isoformat(),
    )
    save_login(Path(env["LEGER_CONFIG_DIR"]) / "auth.json", login)


def leger(env: dict[str, str], *args: str):  # type: ignore[no-untyped-def]
    return run_cli("leger", *args, env=env)


PULLS = [("config", "pull"), ("deploy", "install", "--dry-run")]


def test_a_logged_in_server_out_of_reach_or_behind_a_proxy_is_one_line(
    env: dict[str, str],
) -> None:
    url = closed_url()
    log_in(env, url)
    for args in PULLS:
        assert one_line_error(leger(env, *args), 1).startswith(f"error: cannot reach {url}: ")
    with fake_proxy() as url:
        log_in(env, url)
        for args in PULLS:
            line = one_line_error(leger(env, *args), 1)
            assert f"{url} did not answer with JSON (an HTML page: a proxy in front?)" in line


@pytest.fixture
def plane(tmp_path: Path):  # type: ignore[no-untyped-def]
    with live_server(tmp_path / "data") as server:
        yield server


def test_exit_codes_follow_the_docs(plane: LiveServer, env: dict[str, str]) -> None:
    log_in(env, plane.url, plane.admin_key)
    # Nothing saved yet, a version that does not exist: not found (3).
    assert "404" in one_line_error(leger(env, "config", "pull"), 3)
    install = ("deploy", "install", "x", "--dry-run", "--source")
    assert "404" in one_line_error(leger(env, *install, "leger:999"), 3)
    # A --source that is neither a directory nor a git URL: usage (2).
    missing = one_line_error(leger(env, *install, str(env["LEGER_STATE_DIR"]) + "/nonexist"), 2)
    assert "neither a directory nor a git URL" in missing
    # A key the control plane refuses: failed (1).
    log_in(env, plane.url)
    assert "401" in one_line_error(leger(env, "config", "pull"), 1)
