"""Where a deployment's files come from: the control plane, a git repository, a directory."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from legator.deploy.client import ControlPlane, Login
from legator.deploy.manifest import MANIFEST_NAME, Manifest, build_manifest, verify
from legator.deploy.quadlet.conflicts import is_quadlet
from legator.deploy.quadlet.parse import ParseError, parse_unit


class SourceError(RuntimeError):
    pass


@dataclass(frozen=True)
class GitSource:
    url: str
    branch: str | None
    subpath: str


_GITHUB = re.compile(r"^(https://github\.com/[^/]+/[^/]+?)(?:\.git)?/tree/([^/]+)(?:/(.*))?\Z")
_GITLAB = re.compile(r"^(https://[^/]*gitlab[^/]*/.+?)(?:\.git)?/-/tree/([^/]+)(?:/(.*))?\Z")


def parse_git(url: str) -> GitSource | None:
    """GitHub ``/tree/BRANCH/SUB`` and GitLab ``/-/tree/BRANCH/SUB`` URLs, or any git URL with
    an optional ``#BRANCH[:SUBPATH]``. ``None`` if ``url`` is not a git source."""
    for pattern in (_GITHUB, _GITLAB):
        if match := pattern.match(url.split("?", 1)[0]):
            return GitSource(
                match.group(1) + ".git", match.group(2), (match.group(3) or "").strip("/")
            )
    base, _, fragment = url.partition("#")
    parts = urlsplit(base)
    if parts.scheme in {"https", "http", "ssh", "git", "file"} or base.endswith(".git"):
        branch, _, sub = fragment.partition(":")
        return GitSource(base, branch or None, sub.strip("/"))
    return None


@dataclass
class Fetched:
    """Verified files and the manifest that lists them."""

    manifest: Manifest
    files: dict[str, bytes]
    source: str


def from_control_plane(login: Login, version: str = "latest") -> Fetched:
    """Download the manifest, then every file it lists, verifying each checksum."""
    base = f"/api/v1/deploy/rendered/{version}"
    with ControlPlane(login) as api:
        manifest = Manifest.model_validate(api.get_json(f"{base}/{MANIFEST_NAME}"))
        files: dict[str, bytes] = {}
        for entry in manifest.files:
            data = api.get_bytes(f"{base}/{entry.path}")
            verify(entry, data)
            files[entry.path] = data
    return Fetched(manifest, files, f"{login.server}#version={manifest.version}")


def from_directory(directory: Path) -> Fetched:
    """A directory with a ``manifest.json`` is verified against it; one without gets a manifest
    built from its quadlet files."""
    if not directory.is_dir():
        raise SourceError(f"{directory} is not a directory")
    manifest_path = directory / MANIFEST_NAME
    if manifest_path.exists():
        manifest = Manifest.model_validate_json(manifest_path.read_bytes())
        files = {}
        for entry in manifest.files:
            path = directory / entry.path
            if not path.is_file():
                raise SourceError(f"{entry.path} is listed in the manifest but missing")
            data = path.read_bytes()
            verify(entry, data)
            files[entry.path] = data
        return Fetched(manifest, files, str(directory.resolve()))
    files = {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and is_quadlet(p.name)
    }
    if not files:
        raise SourceError(f"{directory} has no quadlet files and no manifest.json")
    secrets: list[str] = []
    services: list[str] = []
    for name, data in files.items():
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ParseError(name, 0, "not UTF-8 text") from None
        unit = parse_unit(name, text)
        if unit.suffix == ".container":
            services.append(unit.stem)
            secrets += [value.split(",", 1)[0] for value in unit.values("Container", "Secret")]
    manifest = build_manifest(
        files, version=0, created_at=datetime.now(UTC), secrets=secrets, services=services
    )
    return Fetched(manifest, files, str(directory.resolve()))


def from_git(source: GitSource, *, timeout: float = 300) -> Fetched:
    with tempfile.TemporaryDirectory(prefix="leger-git-") as tmp:
        args = ["git", "clone", "--quiet", "--depth", "1"]
        if source.branch:
            args += ["--branch", source.branch]
        proc = subprocess.run(
            [*args, "--", source.url, tmp], capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise SourceError(f"git clone {source.url} failed: {proc.stderr.strip()}")
        root = Path(tmp).resolve()
        target = (root / source.subpath).resolve()
        if not target.is_relative_to(root):
            raise SourceError(f"subpath {source.subpath!r} leaves the repository")
        fetched = from_directory(target)
        fetched.source = source.url + (
            f"#{source.branch or ''}:{source.subpath}" if source.branch or source.subpath else ""
        )
        return fetched


def resolve(source: str | None, login: Login | None, version: str = "latest") -> Fetched:
    """``None`` = the control plane; an existing path = a directory; otherwise a git URL."""
    if source is None or source.startswith("leger:"):
        if login is None:
            raise SourceError("no --source given and not logged in: run `leger auth login`")
        return from_control_plane(login, source.split(":", 1)[1] if source else version)
    path = Path(source).expanduser()
    if path.exists():
        return from_directory(path)
    git = parse_git(source)
    if git is None:
        raise SourceError(f"{source!r} is neither a directory nor a git URL")
    return from_git(git)
