"""Fixtures for Deploy: a locally built image, Podman configured for this machine, the real
quadlet generator, a systemd stand-in on PATH and a leger environment in a temp HOME."""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from legator.deploy.quadlet.generator import find_generator
from tests.deploy import fakesystemd
from tests.deploy.helpers import bare_leger_env, podman

IMAGE = "localhost/leger-test:1"
# Podman 4.3 here needs runc, cgroupfs and explicit ulimits (see MACHINE-NOTES).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:20000", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


@pytest.fixture(scope="session")
def containers_conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("podman") / "containers.conf"
    path.write_text(CONTAINERS_CONF)
    old = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CONTAINERS_CONF", None)
    else:
        os.environ["CONTAINERS_CONF"] = old


@pytest.fixture(scope="session")
def image(containers_conf: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A busybox rootfs imported with ``podman import`` (no registry here)."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is needed (scripts/system-deps.sh installs it)"
    if podman("image", "exists", IMAGE).returncode == 0:
        return IMAGE
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "sleep", "cat", "echo", "env", "ls", "rm", "mkdir", "wait"):
        (root / "bin" / applet).symlink_to("busybox")
    archive = root.parent / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    result = podman("import", "--change", "ENV PATH=/bin", str(archive), IMAGE)
    assert result.returncode == 0, result.stderr
    return IMAGE


@pytest.fixture(scope="session")
def generator() -> str:
    found = find_generator()
    assert found, "the quadlet generator is needed: run scripts/install-quadlet.sh"
    return found


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """leger's directories in a temp HOME, without Podman or systemd."""
    return bare_leger_env(tmp_path)


@pytest.fixture
def leger_env(tmp_path: Path, generator: str, containers_conf: Path) -> dict[str, str]:
    """Environment for running ``leger`` against temp state, a temp quadlet dir and the
    systemd stand-in."""
    bin_dir = tmp_path / "bin"
    fakesystemd.install(bin_dir)
    env = {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "home/.config"),
        "XDG_DATA_HOME": str(tmp_path / "home/.local/share"),
        "LEGER_QUADLET_DIR": str(tmp_path / "home/.config/containers/systemd"),
        "LEGER_SECRETS_DIR": str(tmp_path / "secrets"),
        "FAKE_SYSTEMD_DIR": str(tmp_path / "systemd"),
        "FAKE_SYSTEMD_GENERATOR": generator,
        "CONTAINERS_CONF": str(containers_conf),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    (tmp_path / "secrets").mkdir()
    return env
