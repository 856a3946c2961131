"""leger's install path reads deploy secrets from a real legerd (leger/<user>/<name>)."""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from legator.cli.leger_common import deployer
from legator.deploy.client import Login, save_login
from legator.deploy.layout import layout
from legator.deploy.secrets_source import LegerdSecretSource, MissingSecret, default_source
from legator.secrets.client import Client
from tests.secrets.conftest import LegerdThread


def test_install_reads_the_users_synced_secret_first(
    dev_legerd: LegerdThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dev_legerd.url is not None
    with Client(dev_legerd.url) as client:
        client.put("leger/alice/db-password", b"from-legerd")
        client.put("leger/bob/db-password", b"not-alices")
    monkeypatch.setenv("LEGER_SECRETS_SERVER", dev_legerd.url)
    monkeypatch.setenv("LEGER_SECRET_DB_PASSWORD", "from-env")
    monkeypatch.setenv("LEGER_SECRET_ONLY_IN_ENV", "env-value")
    source = default_source(tmp_path, "alice")
    assert source.get("db-password") == b"from-legerd"
    assert source.get("only-in-env") == b"env-value"  # legerd lacks it: the next source answers
    with pytest.raises(MissingSecret, match="nowhere"):
        source.get("nowhere")
    assert default_source(tmp_path, None).get("db-password") == b"from-env"  # nobody signed in


def test_legerd_source_names_the_missing_secret(dev_legerd: LegerdThread) -> None:
    source = LegerdSecretSource("carol", server=dev_legerd.url)
    with pytest.raises(MissingSecret) as info:
        source.get("api-key")
    assert info.value.name == "api-key" and "leger secrets sync" in str(info.value)


def test_unreachable_legerd_is_a_clear_miss(tmp_path: Path) -> None:
    source = LegerdSecretSource("carol", socket=tmp_path / "absent.sock")
    with pytest.raises(MissingSecret, match="legerd"):
        source.get("api-key")


def test_install_reads_the_namespace_sync_fills(
    dev_legerd: LegerdThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`leger secrets sync` writes leger/<local login>/…; install reads the same even when the
    control-plane user it signed in as has another name (it read leger/<that name>/…)."""
    local = getpass.getuser()
    assert dev_legerd.url is not None
    with Client(dev_legerd.url) as client:
        client.put(f"leger/{local}/db-password", b"synced")
    monkeypatch.setenv("LEGER_SECRETS_SERVER", dev_legerd.url)
    monkeypatch.setenv("LEGER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("LEGER_STATE_DIR", str(tmp_path / "state"))
    where = layout(system=False)
    login = Login("https://cp.example", "lgk_x", "api_key", f"not-{local}", None, None, "now")
    save_login(where.auth_file, login)
    assert deployer(system=False).secrets.get("db-password") == b"synced"
