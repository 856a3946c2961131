"""`leger secrets fetch SERVICE`: a 0600 env file of the service's secrets, or a clear error."""

from __future__ import annotations

from pathlib import Path

from tests.support import run_cli

CONTAINER = """[Unit]
Description=web

[Container]
Image=localhost/busybox:test
Secret=web-db-password,type=env,target=DATABASE_PASSWORD
Secret=web-api-key,type=env
Secret=web-cert,type=mount,target=/run/cert.pem

[Install]
WantedBy=default.target
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    quadlets = tmp_path / "quadlets"
    quadlets.mkdir(exist_ok=True)
    (quadlets / "web.container").write_text(CONTAINER)
    return {
        "LEGER_QUADLET_DIR": str(quadlets),
        "LEGER_STATE_DIR": str(tmp_path / "state"),
        "LEGER_CONFIG_DIR": str(tmp_path / "config"),
        "LEGER_SECRETS_SOCKET": str(tmp_path / "no-legerd.sock"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        **extra,
    }


def test_fetch_writes_a_private_env_file(tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        LEGER_SECRET_WEB_DB_PASSWORD='pa"ss\\word',
        LEGER_SECRET_WEB_API_KEY="k-123",
    )
    result = run_cli("leger", "secrets", "fetch", "web", env=env)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "run" / "web.env"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == 'DATABASE_PASSWORD="pa\\"ss\\\\word"\nWEB_API_KEY="k-123"\n'
    assert "pa" not in result.stdout and "DATABASE_PASSWORD" in result.stdout


def test_a_missing_secret_writes_nothing_and_names_it(tmp_path: Path) -> None:
    env = _env(tmp_path, LEGER_SECRET_WEB_API_KEY="k-123")
    result = run_cli("leger", "secrets", "fetch", "web", env=env)
    assert result.returncode == 1 and "web-db-password" in result.stderr
    assert not (tmp_path / "run" / "web.env").exists()


def test_unknown_service_is_not_found(tmp_path: Path) -> None:
    result = run_cli("leger", "secrets", "fetch", "nope", env=_env(tmp_path))
    assert result.returncode == 3 and "no container named 'nope'" in result.stderr
