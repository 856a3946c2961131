"""``/install.sh`` and the probe zipapp it installs, built here with the stdlib ``zipapp``."""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
import zipapp
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from legator import __version__
from legator.core.auth.permissions import Permission
from legator.core.errors import NotFound
from legator.core.http.deps import require

router = APIRouter(tags=["fleet"])
SRC = Path(__file__).resolve().parents[1]  # .../legator
INSTALL_SH = Path(__file__).with_name("install.sh")
# What the probe needs of this distribution, and nothing else (DESIGN: the probe is lean).
PROBE_FILES = (
    "__init__.py",
    "core/canonical.py",
    "core/audit/__init__.py",
    "core/audit/sanitiser.py",  # stdlib only: what the probe reports is sanitised
    "fleet/protocol.py",
    "cli/probe.py",
)
PROBE_PACKAGES = ("fleet/policy", "probe")  # every module of these
THIRD_PARTY = ("pydantic", "websockets", "psutil", "yaml", "typer")
MAIN = "from legator.cli.probe import main\n\nmain()\n"


def _probe_sources() -> dict[str, bytes]:
    files = {f"legator/{name}": (SRC / name).read_bytes() for name in PROBE_FILES}
    for package in PROBE_PACKAGES:
        for path in sorted((SRC / package).glob("*.py")):
            files[f"legator/{package}/{path.name}"] = path.read_bytes()
    for package in ("core", "fleet", "cli"):
        files[f"legator/{package}/__init__.py"] = b""  # the probe needs none of their code
    return files


@lru_cache(maxsize=1)
def build_zipapp() -> bytes:
    """The probe as one executable file, run by the host's python3."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        for name, data in _probe_sources().items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (root / "__main__.py").write_text(MAIN)
        out = io.BytesIO()
        zipapp.create_archive(root, out, interpreter="/usr/bin/env python3", compressed=True)
        return out.getvalue()


def zipapp_sha256() -> str:
    return hashlib.sha256(build_zipapp()).hexdigest()


@router.get(
    "/install.sh", response_class=PlainTextResponse, dependencies=[require(Permission.PUBLIC)]
)
async def install_script() -> PlainTextResponse:
    """The one-line installer. Public: it holds no secret (the token is an argument)."""
    script = INSTALL_SH.read_text().replace("@VERSION@", __version__)
    return PlainTextResponse(script, media_type="text/x-shellscript")


@router.get("/download/{name}", dependencies=[require(Permission.PUBLIC)])
async def download(name: str) -> Response:
    """``legator-probe-<version>.pyz``: the probe zipapp of this control plane's version."""
    match = re.fullmatch(r"legator-probe-([0-9A-Za-z.+-]+)\.pyz", name)
    if not match or match.group(1) not in (__version__, "latest"):
        raise NotFound(
            f"no download named {name!r}; this server has legator-probe-{__version__}.pyz"
        )
    data = build_zipapp()
    return Response(
        data,
        media_type="application/zip",
        headers={
            "X-Checksum-SHA256": hashlib.sha256(data).hexdigest(),
            "Content-Disposition": f'attachment; filename="legator-probe-{__version__}.pyz"',
        },
    )
