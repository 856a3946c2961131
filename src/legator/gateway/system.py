"""What the host offers: GPUs (nvidia-smi, AMD sysfs), RAM and disk. Nothing here needs a GPU:
without one the lists are empty."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import psutil
from pydantic import BaseModel

MIB = 1024**2
NVIDIA_QUERY = "--query-gpu=index,name,memory.total,memory.free"
DRM = Path("/sys/class/drm")


class Gpu(BaseModel):
    vendor: str
    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int


class Disk(BaseModel):
    path: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    used_percent: float


def nvidia_gpus() -> list[Gpu]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, NVIDIA_QUERY, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            gpus.append(
                Gpu(
                    vendor="nvidia",
                    index=int(parts[0]),
                    name=parts[1],
                    memory_total_bytes=int(float(parts[2]) * MIB),
                    memory_free_bytes=int(float(parts[3]) * MIB),
                )
            )
        except ValueError:
            continue
    return gpus


def amd_gpus(root: Path = DRM) -> list[Gpu]:
    gpus = []
    for index, card in enumerate(sorted(root.glob("card[0-9]*"))):
        device = card / "device"
        total_file, used_file = device / "mem_info_vram_total", device / "mem_info_vram_used"
        if not total_file.is_file():
            continue
        try:
            total = int(total_file.read_text().strip())
            used = int(used_file.read_text().strip()) if used_file.is_file() else 0
        except (OSError, ValueError):
            continue
        gpus.append(
            Gpu(
                vendor="amd",
                index=index,
                name=card.name,
                memory_total_bytes=total,
                memory_free_bytes=max(0, total - used),
            )
        )
    return gpus


def gpus() -> list[Gpu]:
    return nvidia_gpus() + amd_gpus()


def ram_available() -> int:
    return int(psutil.virtual_memory().available)


def disk(path: Path) -> Disk:
    path.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(path)
    return Disk(
        path=str(path),
        total_bytes=usage.total,
        used_bytes=usage.used,
        free_bytes=usage.free,
        used_percent=round(usage.used / usage.total * 100, 2) if usage.total else 0.0,
    )
