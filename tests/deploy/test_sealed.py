"""leger's sealed copies of the Podman secret values it installed (used to roll back)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from legator.deploy.installer import Deployer, DeployError, Options, install
from legator.deploy.podman import Podman
from legator.deploy.sealed import SealedSecrets, SealError
from legator.deploy.secrets_source import EnvSecretSource
from legator.deploy.sources import from_directory
from tests.deploy.test_installer import RecordingSystemd, make_layout, set_secret, unit_dir


def test_a_copy_opens_only_for_its_name_and_podman_id(tmp_path: Path) -> None:
    sealed = SealedSecrets(tmp_path)
    # A value long enough that random base64 of the sealed copies never contains it by chance
    # ("pw" did, now and then).
    password = b"db-password-in-plain-text"
    sealed.put({"db": ("id-1", password), "api": ("id-2", b"key")})
    assert sealed.get("db", "id-1") == password
    assert sealed.get("db", "id-9") is None  # Podman's secret is another one now
    assert sealed.get("nope", "id-1") is None
    raw = json.loads(sealed.path.read_text())
    assert password not in sealed.path.read_bytes()
    raw["secrets"]["db"]["sealed"] = raw["secrets"]["api"]["sealed"]  # moved onto another name
    raw["secrets"]["db"]["id"] = "id-2"
    sealed.path.write_text(json.dumps(raw))
    assert sealed.get("db", "id-2") is None
    sealed.prune({"api": "id-2"})
    assert list(json.loads(sealed.path.read_text())["secrets"]) == ["api"]
    sealed.drop(["api"])
    assert json.loads(sealed.path.read_text())["secrets"] == {}
    assert sealed.path.stat().st_mode & 0o777 == 0o600


def test_a_key_others_can_read_stops_an_apply_before_any_change(
    tmp_path: Path, generator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = make_layout(tmp_path)
    SealedSecrets(layout.state).check()
    key = layout.state / ".secret-seal-key"
    key.chmod(0o644)
    with pytest.raises(SealError, match="readable by others"):
        SealedSecrets(layout.state).check()
    systemd = RecordingSystemd()
    deployer = Deployer(layout, EnvSecretSource(), podman=Podman(), systemd=systemd)
    set_secret(monkeypatch, "leger-unused", "value")
    source = unit_dir(tmp_path / "src", "web", extra="Secret=leger-unused,type=env,target=T")
    with pytest.raises(DeployError, match="chmod 600"):
        install(deployer, "demo", from_directory(source), "src", Options())
    assert systemd.calls == [] and not any(layout.quadlets.iterdir())
    assert deployer.deployments.get("demo") is None
