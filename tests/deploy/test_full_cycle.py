"""The whole path with real parts: control plane -> leger -> quadlet generator -> Podman.

save config -> pull -> install (secret injected as env) -> change -> stage -> diff -> apply ->
a service that fails to start -> automatic rollback of files and volumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.deploy.helpers import calls, leger, podman
from tests.support import LiveServer, free_port

RUN = "trap 'exit 0' TERM; sleep 3600 & wait"
MARKER = "/var/lib/postgresql/data/marker"


def postgres(image: str, port: int, command: str) -> dict[str, object]:
    return {"image": image, "port": port, "command": f'sh -c "{command}"'}


def save(api: httpx.Client, services: dict[str, object], comment: str) -> int:
    response = api.post(
        "/api/v1/deploy/configs", json={"spec": {"services": services}, "comment": comment}
    )
    assert response.status_code == 201, response.text
    return int(response.json()["version"])


def test_full_cycle(
    server: LiveServer, api: httpx.Client, image: str, leger_env: dict[str, str]
) -> None:
    env = {**leger_env, "LEGER_API_KEY": server.admin_key}
    port = free_port()
    v1_postgres = postgres(image, port, f"[ -f {MARKER} ] || echo v1 > {MARKER}; {RUN}")
    redis = {"image": image, "command": f'sh -c "{RUN}"'}
    assert save(api, {"postgres": v1_postgres, "redis": redis}, "first") == 1

    result = leger(env, "auth", "login", "--server", server.url)
    assert result.returncode == 0, result.stderr
    auth_file = Path(env["XDG_CONFIG_HOME"]) / "leger/auth.json"
    assert oct(auth_file.stat().st_mode & 0o777) == "0o600"
    assert leger(env, "config", "pull").returncode == 0
    shown = json.loads(leger(env, "config", "show", "--json").stdout)
    assert shown["version"] == 1 and shown["secrets_required"] == ["postgres-password"]

    Path(env["LEGER_SECRETS_DIR"], "postgres-password").write_text("pw-one")
    try:
        result = leger(env, "deploy", "install", "stack", "--health-timeout", "5")
        assert result.returncode == 0, result.stderr + result.stdout
        # The secret reached the container as an environment variable, via a Podman secret.
        out = podman("exec", "postgres", "sh", "-c", "echo $POSTGRES_PASSWORD")
        assert out.stdout.decode().strip() == "pw-one", out.stderr.decode() + str(calls(env))
        listed = json.loads(leger(env, "deploy", "list", "--json").stdout)
        assert listed[0]["states"] == {"postgres.service": "active", "redis.service": "active"}
        assert listed[0]["ports"] == [port]

        # v2 changes only redis: stage, diff, apply; postgres keeps running.
        save(api, {"postgres": v1_postgres, "redis": {**redis, "memory": "64m"}}, "smaller redis")
        assert leger(env, "staged", "stage", "stack").returncode == 0
        staged = json.loads(leger(env, "staged", "list", "--json").stdout)
        assert staged[0]["version"] == 2
        diff = json.loads(leger(env, "staged", "diff", "stack", "--json").stdout)
        assert diff["affected_services"] == ["redis"]
        assert "+PodmanArgs=--memory 64m" in diff["diff"]
        before = len(calls(env))
        result = leger(env, "staged", "apply", "stack", "--health-timeout", "5")
        assert result.returncode == 0, result.stderr + result.stdout
        stops = [c for c in calls(env)[before:] if c[:3] == ["systemctl", "--user", "stop"]]
        assert stops == [["systemctl", "--user", "stop", "redis.service"]]
        v2_files = {p.name: p.read_bytes() for p in Path(env["LEGER_QUADLET_DIR"]).iterdir()}

        # v3: postgres overwrites its data and dies -> health check fails -> rollback.
        broken = postgres(image, port, f"echo v3 > {MARKER}; exit 1")
        save(api, {"postgres": broken, "redis": {**redis, "memory": "64m"}}, "broken")
        assert leger(env, "staged", "stage", "stack").returncode == 0
        result = leger(env, "staged", "apply", "stack", "--health-timeout", "5")
        assert result.returncode == 5, result.stderr + result.stdout
        assert "rolled back" in result.stderr
        now_files = {p.name: p.read_bytes() for p in Path(env["LEGER_QUADLET_DIR"]).iterdir()}
        assert now_files == v2_files
        marker = podman("exec", "postgres", "cat", MARKER).stdout.decode().strip()
        assert marker == "v1"  # the volume came back from the automatic backup
        listed = json.loads(leger(env, "deploy", "list", "--json").stdout)
        assert listed[0]["version"] == 2
        assert set(listed[0]["states"].values()) == {"active"}
        backups = json.loads(leger(env, "backup", "list", "--json").stdout)
        assert len(backups) == 3 and all(b["automatic"] for b in backups)
    finally:
        result = leger(env, "deploy", "remove", "stack", "--remove-volumes")
    assert result.returncode == 0, result.stderr
    assert podman("secret", "inspect", "postgres-password").returncode != 0
    assert podman("volume", "exists", "systemd-postgres-data").returncode != 0
    assert podman("container", "exists", "postgres").returncode != 0
    assert podman("network", "exists", "systemd-legator").returncode != 0
