"""Settings: defaults, validation, and the one-line error at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from legator.core.config import ConfigError, load_settings
from tests.support import run_cli


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LEGATOR_ADDR", "LEGATOR_DATA_DIR", "LEGATOR_DATABASE_URL", "LEGATOR_AUTH"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.addr == ":8080" and settings.port == 8080 and settings.host == "0.0.0.0"
    assert settings.auth is True
    assert settings.effective_database_url == "sqlite+aiosqlite://"


def test_data_dir_and_database_url(tmp_path: Path) -> None:
    assert load_settings(data_dir=tmp_path).effective_database_url.endswith("/legator.db")
    pg = load_settings(data_dir=tmp_path, database_url="postgres://u:p@db/legator")
    assert pg.effective_database_url == "postgresql+asyncpg://u:p@db/legator"


@pytest.mark.parametrize(
    ("field", "value", "variable"),
    [
        ("addr", "nonsense", "LEGATOR_ADDR"),
        ("addr", ":99999", "LEGATOR_ADDR"),
        ("database_url", "mysql://x", "LEGATOR_DATABASE_URL"),
        ("signing_key", "abc", "LEGATOR_SIGNING_KEY"),
        ("signing_key", "z" * 64, "LEGATOR_SIGNING_KEY"),
        ("server_url", "ftp://x", "LEGATOR_SERVER_URL"),
        ("log_level", "loud", "LEGATOR_LOG_LEVEL"),
        ("jobs_retry_max_attempts", "0", "LEGATOR_JOBS_RETRY_MAX_ATTEMPTS"),
        ("llm_provider", "skynet", "LEGATOR_LLM_PROVIDER"),
        ("gateway_usage_retention_days", "7", "LEGATOR_GATEWAY_USAGE_RETENTION_DAYS"),
        ("gateway_usage_retention_days", "-1", "LEGATOR_GATEWAY_USAGE_RETENTION_DAYS"),
        ("fleet_command_retention_days", "-1", "LEGATOR_FLEET_COMMAND_RETENTION_DAYS"),
        ("audit_retention_days", "-1", "LEGATOR_AUDIT_RETENTION_DAYS"),
        ("replica_url", "ftp://cp-1", "LEGATOR_REPLICA_URL"),
        ("replica_url", "http://user:secret@cp-1:8080", "LEGATOR_REPLICA_URL"),
    ],
)
def test_bad_values_name_the_variable(field: str, value: str, variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**{field: value})
    assert str(info.value).startswith(variable + ":")
    assert "\n" not in str(info.value)


def test_auth_off_only_on_loopback() -> None:
    assert load_settings(auth=False, addr="127.0.0.1:9000").auth is False
    assert load_settings(auth=False, addr="[::1]:9000").auth is False
    with pytest.raises(ConfigError, match="loopback"):
        load_settings(auth=False, addr=":9000")


def test_bad_env_stops_serve_with_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli(
        "legator", "serve", env={"LEGATOR_ADDR": "nowhere", "LEGATOR_DATA_DIR": str(tmp_path)}
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "LEGATOR_ADDR" in lines[0]


def test_auth_false_on_public_address_refuses_to_start(tmp_path: Path) -> None:
    everywhere = "0.0.0.0:18999"
    result = run_cli("legator", "serve", env={"LEGATOR_AUTH": "false", "LEGATOR_ADDR": everywhere})
    assert result.returncode == 2
    assert "LEGATOR_AUTH" in result.stderr


def test_signing_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    from legator.core.security import load_or_create_signing_key

    first = load_or_create_signing_key(None, tmp_path)
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_signing_key(None, tmp_path) == first
    configured = "ab" * 32
    assert load_or_create_signing_key(configured, tmp_path) == bytes.fromhex(configured)


OIDC = {
    "oidc_issuer": "https://id.example.com/realms/main/",
    "oidc_client_id": "legator",
    "oidc_redirect_url": "https://legator.example.com/api/v1/auth/oidc/callback",
}


def test_oidc_is_on_when_issuer_client_and_redirect_are_set() -> None:
    assert load_settings().oidc_enabled is False
    settings = load_settings(**OIDC)
    assert settings.oidc_enabled and settings.oidc_client_secret is None  # a public client
    assert settings.oidc_issuer == "https://id.example.com/realms/main"
    with_secret = load_settings(**OIDC, oidc_client_secret="s3cret", oidc_scopes="openid  email")
    assert with_secret.oidc_scopes == "openid email"
    loopback = {**OIDC, "oidc_issuer": "http://127.0.0.1:5556/dex"}
    assert load_settings(**loopback).oidc_enabled
    assert settings.oidc_create_users is True
    assert load_settings(**OIDC, oidc_create_users="false").oidc_create_users is False


@pytest.mark.parametrize(
    "missing", ["oidc_issuer", "oidc_client_id", "oidc_redirect_url"], ids=lambda m: m
)
def test_partial_oidc_settings_name_the_missing_variable(missing: str) -> None:
    partial = {name: value for name, value in OIDC.items() if name != missing}
    with pytest.raises(ConfigError) as info:
        load_settings(**partial)
    message = str(info.value)
    assert message.startswith(f"LEGATOR_{missing.upper()}: must be set for single sign-on")
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"^LEGATOR_OIDC_ISSUER: "):
        load_settings(oidc_client_secret="s3cret")


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("oidc_issuer", "http://id.example.com", "https://"),
        ("oidc_issuer", "id.example.com", "http:// or https://"),
        ("oidc_issuer", "http://localhost.evil.example", "https://"),
        ("oidc_issuer", "http://127.0.0.1@evil.example", "https://"),
        ("oidc_issuer", "https://user:s3cret@id.example.com", "without user:password@"),
        ("oidc_issuer", "https://id.example.com/realms/main?x=1", "?query"),
        ("oidc_issuer", "https://id.example.com/#main", "#fragment"),
        ("oidc_redirect_url", "https://legator.example.com/callback", "/api/v1/auth/oidc"),
        (
            "oidc_redirect_url",
            "https://legator.example.com/api/v1/auth/oidc/callback#x",
            "/api/v1/auth/oidc",
        ),
        (
            "oidc_redirect_url",
            "https://u:p@legator.example.com/api/v1/auth/oidc/callback",
            "user:password@",
        ),
        ("oidc_scopes", "email profile", "openid"),
        ("oidc_default_role", "root", "'viewer'"),
        ("oidc_default_role", "admin", "never given automatically"),
        ("oidc_create_users", "maybe", "valid boolean"),
    ],
)
def test_bad_oidc_values_name_the_variable(field: str, value: str, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**{**OIDC, field: value})
    assert str(info.value).startswith(f"LEGATOR_{field.upper()}:")
    assert rule in str(info.value)
    assert "s3cret" not in str(info.value)  # a password in the URL is never echoed


def test_partial_oidc_env_stops_serve_with_one_line(tmp_path: Path) -> None:
    env = {"LEGATOR_DATA_DIR": str(tmp_path), "LEGATOR_OIDC_ISSUER": OIDC["oidc_issuer"]}
    result = run_cli("legator", "serve", env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "LEGATOR_OIDC_CLIENT_ID: must be set" in lines[0], lines


def test_the_settings_repr_holds_no_password() -> None:
    settings = load_settings(
        database_url="postgresql://app:DBPASS@db/legator", llm_base_url="http://u:LLMPASS@proxy/v1"
    )
    assert "DBPASS" not in repr(settings) and "LLMPASS" not in repr(settings)
