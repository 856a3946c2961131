"""A llama.cpp server image built locally (no registry here): the test interpreter, the
packages ``python -m llama_cpp.server`` imports, and the shared libraries they link, put in a
rootfs tarball and brought in with ``podman import``. Entrypoint: ``python -m
llama_cpp.server`` (the ``llama-cpp-python`` flavour of the podman runtime)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

IMAGE = "localhost/legator-llamacpp-test"
PROBE = (
    "import sys, llama_cpp.server.app, llama_cpp.server.__main__, uvicorn, uvicorn.loops.auto,"
    " uvicorn.protocols.http.auto, uvicorn.lifespan.on;"
    "print('\\n'.join(sorted({getattr(m, '__file__', None) or '' for m in sys.modules.values()})))"
)
SKIP_STDLIB = {"test", "idlelib", "tkinter", "ensurepip", "lib2to3", "turtledemo", "site-packages"}


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _libs(paths: list[Path]) -> set[Path]:
    found: set[Path] = set()
    for path in paths:
        try:
            out = _run("ldd", str(path))
        except subprocess.CalledProcessError:
            continue
        for line in out.splitlines():
            parts = line.split()
            for part in parts:
                if part.startswith("/") and Path(part).exists():
                    found.add(Path(part))
    return found


def build(workdir: Path) -> str:
    site = Path(sysconfig.get_paths()["purelib"])
    base = Path(sys.base_prefix)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    loaded = [Path(p) for p in _run(sys.executable, "-c", PROBE).split() if p]
    packages = {p.relative_to(site).parts[0] for p in loaded if site in p.parents}
    packages |= {f"{name}.libs" for name in packages if (site / f"{name}.libs").is_dir()}
    tag = hashlib.sha256("|".join(sorted(packages)).encode()).hexdigest()[:12]
    image = f"{IMAGE}:{tag}"
    if subprocess.run(["podman", "image", "exists", image]).returncode == 0:
        return image
    root = workdir / "rootfs"
    py = root / "opt" / "py"
    (py / "bin").mkdir(parents=True)
    shutil.copy2(Path(sys.executable).resolve(), py / "bin" / "python3")
    shutil.copytree(base / "lib", py / "lib", ignore=_ignore_stdlib(stdlib), symlinks=True)
    for name in packages:
        source = site / name
        if source.is_dir():
            shutil.copytree(source, root / "opt" / "site" / name, symlinks=True)
        else:
            (root / "opt" / "site").mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / "opt" / "site" / name)
    binaries = [py / "bin" / "python3", *root.rglob("*.so"), *root.rglob("*.so.*")]
    for lib in _libs(binaries):
        if root in lib.parents:
            continue  # already in the image (libpython)
        target = root / lib.relative_to("/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib.resolve(), target)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/false\n")
    archive = workdir / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".", filter=_world_readable)
    subprocess.run(
        [
            "podman",
            "import",
            "--change",
            "ENV PYTHONHOME=/opt/py",
            "--change",
            "ENV PYTHONPATH=/opt/site",
            "--change",
            "ENV LD_LIBRARY_PATH=/opt/py/lib",
            "--change",
            'ENTRYPOINT ["/opt/py/bin/python3", "-m", "llama_cpp.server"]',
            str(archive),
            image,
        ],
        check=True,
        capture_output=True,
    )
    return image


def _ignore_stdlib(stdlib: Path):  # type: ignore[no-untyped-def]
    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory) == stdlib:
            return {n for n in names if n in SKIP_STDLIB}
        return {n for n in names if n == "__pycache__"} if "test" in directory else set()

    return ignore


def _world_readable(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The container runs as an unprivileged UID: everything must be readable by others.
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if info.isdir() or info.mode & 0o111:
        info.mode |= 0o555
    else:
        info.mode |= 0o444
    return info
