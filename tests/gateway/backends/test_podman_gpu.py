"""Which devices and image a podman backend gets, by what the host offers (no GPU needed:
the CDI spec and /dev/dri are looked for at paths the test controls)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from legator.gateway.runtimes import podman
from legator.gateway.runtimes.podman import DEFAULT_IMAGE, PodmanRuntime


def _launch(layers: int) -> SimpleNamespace:
    return SimpleNamespace(args=SimpleNamespace(n_gpu_layers=layers))


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(podman, "CDI_SPECS", (tmp_path / "cdi" / "nvidia.yaml",))
    monkeypatch.setattr(podman, "DRI", tmp_path / "dri")
    return tmp_path


def test_cpu_only_keeps_the_image(host: Path) -> None:
    (host / "dri").mkdir()
    assert PodmanRuntime(DEFAULT_IMAGE)._gpu(_launch(0)) == ([], DEFAULT_IMAGE)  # type: ignore[arg-type]


def test_nvidia_by_cdi_gets_the_cuda_image(host: Path) -> None:
    (host / "cdi").mkdir()
    (host / "cdi" / "nvidia.yaml").write_text("cdiVersion: 0.5.0\n")
    devices, image = PodmanRuntime(DEFAULT_IMAGE)._gpu(_launch(99))  # type: ignore[arg-type]
    assert devices == ["--device", "nvidia.com/gpu=all"] and image == DEFAULT_IMAGE + "-cuda"


def test_dri_gets_the_vulkan_image_and_a_chosen_image_is_kept(host: Path) -> None:
    (host / "dri").mkdir()
    devices, image = PodmanRuntime(DEFAULT_IMAGE)._gpu(_launch(20))  # type: ignore[arg-type]
    assert devices == ["--device", str(host / "dri")] and image == DEFAULT_IMAGE + "-vulkan"
    own = "registry.example/llama:mine"
    assert PodmanRuntime(own)._gpu(_launch(20))[1] == own  # type: ignore[arg-type]


def test_no_gpu_on_the_host_means_no_devices(host: Path) -> None:
    assert PodmanRuntime(DEFAULT_IMAGE)._gpu(_launch(20)) == ([], DEFAULT_IMAGE)  # type: ignore[arg-type]
