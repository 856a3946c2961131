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
