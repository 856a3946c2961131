"""The installer's own guarantees: one operation at a time, rollback on a timed-out call,
restoring the backup taken before a first install, and services restarted for a new secret.

Real Podman (secrets), the real quadlet generator (validation), and at the systemd edge either
a Python stand-in that records calls or a ``systemctl`` script on PATH that hangs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from legator.core.security import random_hex
from legator.deploy.installer import Deployer, Options, RolledBack, install
from legator.deploy.layout import Layout
from legator.deploy.lock import LockTimeout, state_lock
from legator.deploy.podman import Podman
from legator.deploy.secrets_source import EnvSecretSource
from legator.deploy.sources import from_directory
from legator.deploy.systemd import Result, Systemd
from tests.deploy.helpers import leger, podman


class RecordingSystemd(Systemd):
    """systemd at the edge: records each call; every started unit is active (or ``failing``)."""

    def __init__(self) -> None:
        super().__init__(system=False)
        self.calls: list[tuple[str, ...]] = []
        self.failing = False
        self.in_health_check: threading.Event = threading.Event()
        self.health_delay = 0.0
        self.health_windows: list[tuple[float, float]] = []

    def run(self, *args: str, check: bool = True) -> Result:
        if args[0] != "is-active":
            self.calls.append(args)
        return Result(0, "\n".join("active" for _ in args[1:]), "")

    def wait_healthy(self, units: list[str], timeout: float, settle: float = 0.5) -> dict[str, str]:  # type: ignore[override]
        start = time.monotonic()
        self.in_health_check.set()
        time.sleep(self.health_delay)
        self.health_windows.append((start, time.monotonic()))
        return {unit: "failed" if self.failing else "active" for unit in units}


def make_layout(root: Path) -> Layout:
    return Layout(system=False, state=root / "state", quadlets=root / "quadlets", config=root / "c")


def unit_dir(directory: Path, name: str, image: str = "localhost/x:1", extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.container").write_text(
        f"[Container]\nImage={image}\n{extra}\n[Install]\nWantedBy=default.target\n"
    )
    return directory


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A unique Podman secret name, its value read from the environment; removed afterwards."""
    name = f"leger-it-{random_hex(4)}"
    yield name
    podman("secret", "rm", name)


def set_secret(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv("LEGER_SECRET_" + name.upper().replace("-", "_"), value)


def test_two_applies_at_once_run_one_after_the_other(tmp_path: Path, generator: str) -> None:
    layout = make_layout(tmp_path)
    first, second = RecordingSystemd(), RecordingSystemd()
    first.health_delay = second.health_delay = 0.5
    sources = {n: from_directory(unit_dir(tmp_path / n, n)) for n in ("alpha", "beta")}
    errors: list[BaseException] = []

    def go(name: str, systemd: RecordingSystemd) -> None:
        try:
            deployer = Deployer(layout, EnvSecretSource(), podman=Podman(), systemd=systemd)
            install(deployer, name, sources[name], name, Options())
        except BaseException as exc:  # reported below
            errors.append(exc)

    one = threading.Thread(target=go, args=("alpha", first))
    two = threading.Thread(target=go, args=("beta", second))
    one.start()
    assert first.in_health_check.wait(30)  # alpha is in the middle of its apply
    two.start()
    one.join(60)
    two.join(60)
    assert errors == []
    alpha_done, beta_began = first.health_windows[0][1], second.health_windows[0][0]
    assert alpha_done <= beta_began, "beta ran while alpha was still being applied"
    assert sorted(json.loads(layout.deployments.read_text())) == ["alpha", "beta"]
    assert sorted(p.name for p in layout.quadlets.glob("*.container")) == [
        "alpha.container",
        "beta.container",
    ]


def test_a_held_lock_times_out_with_a_clear_message(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    layout = make_layout(tmp_path)
    deployer = Deployer(
        layout, EnvSecretSource(), podman=Podman(), systemd=RecordingSystemd(), lock_timeout=0.3
    )
    state = Path(leger_env["XDG_DATA_HOME"]) / "leger"
    with state_lock(layout.state):
        with pytest.raises(LockTimeout, match="another leger operation is still running"):
            deployer.remove("demo", remove_volumes=False, backup_volumes=False)
        with state_lock(state):
            env = {**leger_env, "LEGER_LOCK_TIMEOUT": "0.5"}
            result = leger(env, "deploy", "remove", "demo")
    assert result.returncode == 1, result.stderr
    assert "another leger operation is still running" in result.stderr
    assert leger(leger_env, "deploy", "remove", "demo").returncode == 3  # free again


def test_a_timed_out_systemctl_rolls_back(
    tmp_path: Path, generator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slow = tmp_path / "slow"
    # The next `start` after `slow` appears hangs (once); everything else answers at once.
    (bin_dir / "systemctl").write_text(
        "#!/bin/sh\n"
        f'case "$2" in start) [ -e {slow} ] && rm {slow} && sleep 5;; '
        "is-active) shift 2; for u; do echo active; done;; esac\nexit 0\n"
    )
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    layout = make_layout(tmp_path)
    deployer = Deployer(layout, EnvSecretSource(), podman=Podman(), systemd=Systemd(timeout=1))
    v1 = unit_dir(tmp_path / "v1", "web", image="localhost/x:1")
    assert install(deployer, "demo", from_directory(v1), "v1", Options(health_timeout=2)).applied
    slow.touch()
    v2 = unit_dir(tmp_path / "v2", "web", image="localhost/x:2")
    with pytest.raises(RolledBack, match="no answer within 1 s"):
        install(deployer, "demo", from_directory(v2), "v2", Options(health_timeout=2))
    assert "Image=localhost/x:1" in (layout.quadlets / "web.container").read_text()
    recorded = deployer.deployments.get("demo")
    assert recorded is not None and recorded.source == "v1"


def test_restoring_the_backup_before_a_first_install_removes_the_deployment(
    tmp_path: Path, generator: str, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    set_secret(monkeypatch, secret, "tok")
    layout = make_layout(tmp_path)
    systemd = RecordingSystemd()
    deployer = Deployer(layout, EnvSecretSource(), podman=Podman(), systemd=systemd)
    source = unit_dir(tmp_path / "src", "web", extra=f"Secret={secret},type=env,target=TOKEN")
    result = install(deployer, "demo", from_directory(source), "src", Options())
    assert result.backup is not None and result.backup.version == -1
    assert podman("secret", "inspect", secret).returncode == 0

    deployer.restore(result.backup.id)
    assert list(layout.quadlets.iterdir()) == []
    assert deployer.deployments.get("demo") is None
    assert not (layout.active / "demo").exists()
    assert podman("secret", "inspect", secret).returncode != 0  # only it used the secret
    assert ("stop", "web.service") in systemd.calls


def test_a_new_secret_value_restarts_its_users(
    tmp_path: Path, generator: str, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    layout = make_layout(tmp_path)
    systemd = RecordingSystemd()
    deployer = Deployer(layout, EnvSecretSource(), podman=Podman(), systemd=systemd)
    unit_dir(tmp_path / "src", "web", extra=f"Secret={secret},type=env,target=TOKEN")
    unit_dir(tmp_path / "src", "other")
    source = tmp_path / "src"
    set_secret(monkeypatch, secret, "old-value")
    install(deployer, "demo", from_directory(source), "src", Options())

    same = install(deployer, "demo", from_directory(source), "src", Options(dry_run=True))
    assert same.plan.stop == []  # nothing changed: nothing to restart

    set_secret(monkeypatch, secret, "new-value")
    systemd.calls.clear()
    result = install(deployer, "demo", from_directory(source), "src", Options())
    assert result.plan.stop == ["web.service"]  # `other` does not use the secret
    stop = systemd.calls.index(("stop", "web.service"))
    assert any(c[0] == "start" and "web.service" in c for c in systemd.calls[stop:])


def read_secret(image: str, secret: str) -> str:
    """The value a container started now gets for ``secret`` (as ``$TOKEN``)."""
    out = podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--secret",
        f"{secret},type=env,target=TOKEN",
        image,
        "sh",
        "-c",
        "echo $TOKEN",
    )
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode().strip()


def test_a_rollback_gives_a_replaced_secret_its_previous_value(
    tmp_path: Path, generator: str, image: str, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    layout = make_layout(tmp_path)
    systemd = RecordingSystemd()
    deployer = Deployer(layout, EnvSecretSource(), podman=Podman(), systemd=systemd)
    extra = f"Secret={secret},type=env,target=TOKEN"
    set_secret(monkeypatch, secret, "old-value")
    v1 = unit_dir(tmp_path / "v1", "web", image="localhost/x:1", extra=extra)
    install(deployer, "demo", from_directory(v1), "v1", Options())
    before = deployer.deployments.get("demo")
    assert before is not None
    assert read_secret(image, secret) == "old-value"
    # An apply of another deployment, without secrets, in between changes nothing of that.
    other = unit_dir(tmp_path / "other", "other")
    install(deployer, "other", from_directory(other), "other", Options())

    set_secret(monkeypatch, secret, "new-value")
    systemd.failing = True
    systemd.calls.clear()
    v2 = unit_dir(tmp_path / "v2", "web", image="localhost/x:2", extra=extra)
    with pytest.raises(RolledBack) as raised:
        install(deployer, "demo", from_directory(v2), "v2", Options())
    assert read_secret(image, secret) == "old-value"
    assert f"secrets {secret} have their previous value again" in str(raised.value)
    # The previous service was stopped for the new value and started again with the old one.
    assert ("stop", "web.service") in systemd.calls
    assert systemd.calls[-1] == ("start", "web.service")
    assert deployer.deployments.get("demo") == before  # the record still names the old value

    # The copy that made this possible is sealed and private.
    copies = layout.state / "podman-secrets.json"
    assert copies.stat().st_mode & 0o777 == 0o600
    assert (layout.state / ".secret-seal-key").stat().st_mode & 0o777 == 0o600
    assert b"old-value" not in copies.read_bytes() and b"new-value" not in copies.read_bytes()

    # A second failed apply restores it again (the restored secret has a copy too) ...
    with pytest.raises(RolledBack, match="have their previous value again"):
        install(deployer, "demo", from_directory(v2), "v2", Options())
    assert read_secret(image, secret) == "old-value"
    # ... and a good one installs the new value.
    systemd.failing = False
    install(deployer, "demo", from_directory(v2), "v2", Options())
    assert read_secret(image, secret) == "new-value"
    deployer.remove("demo", remove_volumes=False, backup_volumes=False)
    assert secret not in json.loads(copies.read_text())["secrets"]


def test_a_rollback_removes_a_secret_the_failed_apply_created(
    tmp_path: Path, generator: str, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    layout = make_layout(tmp_path)
    systemd = RecordingSystemd()
    deployer = Deployer(layout, EnvSecretSource(), podman=Podman(), systemd=systemd)
    v1 = unit_dir(tmp_path / "v1", "web", image="localhost/x:1")
    install(deployer, "demo", from_directory(v1), "v1", Options())

    set_secret(monkeypatch, secret, "value")
    systemd.failing = True
    v2 = unit_dir(tmp_path / "v2", "web", extra=f"Secret={secret},type=env,target=TOKEN")
    with pytest.raises(RolledBack) as raised:
        install(deployer, "demo", from_directory(v2), "v2", Options())
    assert secret not in str(raised.value)
    assert podman("secret", "inspect", secret).returncode != 0
    copies = json.loads((layout.state / "podman-secrets.json").read_text())
    assert secret not in copies["secrets"]


def test_a_secret_replaced_by_hand_is_not_restored_from_a_stale_copy(
    tmp_path: Path, generator: str, image: str, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    layout = make_layout(tmp_path)
    systemd = RecordingSystemd()
    deployer = Deployer(layout, EnvSecretSource(), podman=Podman(), systemd=systemd)
    extra = f"Secret={secret},type=env,target=TOKEN"
    set_secret(monkeypatch, secret, "leger-value")
    v1 = unit_dir(tmp_path / "v1", "web", image="localhost/x:1", extra=extra)
    install(deployer, "demo", from_directory(v1), "v1", Options())
    # Someone replaces the secret behind leger's back: leger's copy no longer describes it.
    podman("secret", "rm", secret)
    assert podman("secret", "create", secret, "-", input=b"hand-value").returncode == 0

    set_secret(monkeypatch, secret, "new-value")
    systemd.failing = True
    v2 = unit_dir(tmp_path / "v2", "web", image="localhost/x:2", extra=extra)
    with pytest.raises(RolledBack, match=f"secrets {secret} keep their new value"):
        install(deployer, "demo", from_directory(v2), "v2", Options())
    # Neither the stale copy nor a guess: the value stays the new one, and the record says so.
    assert read_secret(image, secret) == "new-value"
    systemd.failing = False
    again = install(deployer, "demo", from_directory(v1), "v1", Options(dry_run=True))
    assert again.plan.stop == []  # the stored value is the one the source gives now
