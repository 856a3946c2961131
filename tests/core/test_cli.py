"""The offline admin CLI and the first-start / restart behaviour of `legator serve`."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, free_port, parse_credentials, run_cli


def test_users_and_keys_offline(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    created = run_cli(
        "legator",
        "users",
        "create",
        "ops",
        "--role",
        "operator",
        "--password-stdin",
        *data,
        input="a very long password\n",
    )
    assert created.returncode == 0, created.stderr
    assert "password" not in created.stdout.lower().replace("--password", "")
    duplicate = run_cli("legator", "users", "create", "ops", *data)
    assert duplicate.returncode == 4 and "already exists" in duplicate.stderr
    generated = run_cli("legator", "users", "create", "robot", *data)
    assert "password (shown once)" in generated.stdout

    listing = json.loads(run_cli("legator", "users", "list", "--json", *data).stdout)
    assert {u["username"]: u["role"] for u in listing} == {"ops": "operator", "robot": "viewer"}
    assert run_cli("legator", "users", "set-role", "robot", "auditor", *data).returncode == 0
    assert run_cli("legator", "users", "disable", "robot", *data).returncode == 0
    listing = json.loads(run_cli("legator", "users", "list", "--json", *data).stdout)
    robot = next(u for u in listing if u["username"] == "robot")
    assert robot["role"] == "auditor" and robot["disabled"] is True

    key = run_cli("legator", "keys", "create", "--user", "ops", "--expires", "30d", *data)
    assert key.returncode == 0, key.stderr
    raw = key.stdout.strip()
    assert raw.startswith("lgk_") and len(raw) == 68
    keys = json.loads(run_cli("legator", "keys", "list", "--json", *data).stdout)
    assert raw not in json.dumps(keys)
    assert keys[0]["expires_at"] is not None
    revoked = run_cli("legator", "keys", "revoke", keys[0]["prefix"], *data)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    missing = run_cli("legator", "keys", "revoke", "nope", *data)
    assert missing.returncode == 3
    bad_duration = run_cli("legator", "keys", "create", "--user", "ops", "--expires", "soon", *data)
    assert bad_duration.returncode == 2


def test_an_unreachable_database_or_unwritable_path_is_a_one_line_error(tmp_path: Path) -> None:
    nobody_listens = f"postgresql://postgres@127.0.0.1:{free_port()}/legator"
    refused = run_cli("legator", "db", "current", env={"LEGATOR_DATABASE_URL": nobody_listens})
    assert refused.returncode == 1 and "database: " in refused.stderr
    assert run_cli("legator", "db", "upgrade", "--data-dir", str(tmp_path)).returncode == 0
    unwritable = run_cli("legator", "backup", "/proc/legator/copy.db", "--data-dir", str(tmp_path))
    assert unwritable.returncode == 1 and "cannot write /proc/legator/copy.db" in unwritable.stderr
    for failed in (refused, unwritable):
        assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_offline_commands_need_a_data_dir() -> None:
    result = run_cli("legator", "users", "list", env={"LEGATOR_DATA_DIR": ""})
    assert result.returncode == 2 and "LEGATOR_DATA_DIR" in result.stderr


def test_first_start_prints_credentials_once_and_restart_keeps_state(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data").start()
    first = server.stop()
    password, key = parse_credentials(first)
    logs_dir = tmp_path / "data"
    assert password not in "".join(p.read_text(errors="ignore") for p in logs_dir.glob("*.log"))

    server.start()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as api:
            assert api.get("/api/v1/me").json()["username"] == "admin"
            created = api.post(
                "/api/v1/users",
                json={"username": "kept", "password": "kept kept kept", "role": "viewer"},
            )
            assert created.status_code == 201
            new_key = api.post("/api/v1/keys", json={"name": "kept"}).json()["key"]
    finally:
        second = server.stop()
    assert "admin password" not in second

    server.start()
    try:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {new_key}"}
        ) as api:
            assert api.get("/api/v1/me").status_code == 200
            users = [u["username"] for u in api.get("/api/v1/users").json()]
            assert users == ["admin", "kept"]
            actions = [e["action"] for e in api.get("/api/v1/audit").json()["events"]]
            assert {"system.bootstrap", "user.create", "api_key.create"} <= set(actions)
        with httpx.Client(base_url=server.url) as anon:
            login = anon.post(
                "/api/v1/auth/login", json={"username": "admin", "password": password}
            )
            assert login.status_code == 200
    finally:
        server.stop()


def test_version() -> None:
    info = json.loads(run_cli("legator", "version", "--json").stdout)
    assert set(info) == {"version", "commit", "date"}


@pytest.mark.parametrize("access_log", ["true", "false"])
def test_the_access_log_can_be_turned_off_alone(tmp_path: Path, access_log: str) -> None:
    log_path = tmp_path / "serve.log"
    server = ServerProcess(
        tmp_path / "data",
        log_path=log_path,
        LEGATOR_ACCESS_LOG=access_log,
        LEGATOR_LOG_FORMAT="json",
    ).start()
    try:
        for path in ("/api/v1/me", "/api/v1/nothing-here"):
            httpx.get(server.url + path, timeout=5)
    finally:
        server.stop()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    loggers = {line.get("logger") for line in lines}
    assert "legator" in loggers  # the other lines stay ("legator started", "legator stopped")
    requests = [line for line in lines if line.get("logger") == "legator.access"]
    if access_log == "true":
        assert {(r["path"], r["status"]) for r in requests} >= {
            ("/api/v1/me", 401),
            ("/api/v1/nothing-here", 404),
        }
    else:
        assert requests == []


def test_open_event_streams_do_not_hold_up_a_shutdown(tmp_path: Path) -> None:
    # uvicorn waits for every response under way (up to 10 s); streams that never end by
    # themselves end as soon as the shutdown begins.
    server = ServerProcess(tmp_path / "data").start()
    _password, key = parse_credentials(server.stop())
    server.start()
    opened = threading.Barrier(3)

    def follow(path: str) -> None:
        with (
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as api,
            api.stream("GET", path, timeout=30) as response,
        ):
            assert response.status_code == 200
            opened.wait(10)
            with contextlib.suppress(httpx.HTTPError):
                for _ in response.iter_bytes():
                    pass

    streams = [
        threading.Thread(target=follow, args=(path,), daemon=True)
        for path in ("/api/v1/events", "/api/v1/gateway/events")
    ]
    for stream in streams:
        stream.start()
    opened.wait(10)
    started = time.monotonic()
    server.stop()
    # Held up, it takes uvicorn's 10 s; the margin is for a slow or stalled machine.
    assert time.monotonic() - started < 9, "open streams held up the shutdown"
