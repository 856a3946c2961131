"""Where a deployment's files come from: the control plane, a git repository, a directory."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from legator.core.bounded_http import size_text
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


MAX_MANIFEST_BYTES = 1024 * 1024
MAX_FILES = 1024
"""A rendered configuration has at most 256 services, each a few quadlet files."""
MAX_FILE_BYTES = 1024 * 1024
MAX_TOTAL_BYTES = 16 * 1024 * 1024
"""Quadlet files are small text: the limits only stop a hostile or broken server, or a
repository someone else controls, from making leger hold unbounded files in memory."""


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
        manifest_path = f"{base}/{MANIFEST_NAME}"
        manifest = Manifest.model_validate(api.get_json(manifest_path, limit=MAX_MANIFEST_BYTES))
        _check_sizes(manifest_path, _sizes(manifest))
        files: dict[str, bytes] = {}
        for entry in manifest.files:
            # No more than the manifest says is read: a longer answer is refused as it arrives.
            data = api.get_bytes(f"{base}/{entry.path}", limit=entry.size)
            verify(entry, data)
            files[entry.path] = data
    return Fetched(manifest, files, f"{login.server}#version={manifest.version}")


def _sizes(manifest: Manifest) -> dict[str, int]:
    return {entry.path: entry.size for entry in manifest.files}


def _check_sizes(where: str, sizes: dict[str, int]) -> None:
    """Refuse, before reading any file, a set of files leger would not hold (``sizes``:
    name -> bytes, as a manifest or the file system gives them)."""
    if len(sizes) > MAX_FILES:
        raise SourceError(f"{where}: lists {len(sizes)} files, over the {MAX_FILES} leger accepts")
    for name, size in sizes.items():
        if size > MAX_FILE_BYTES:
            raise SourceError(
                f"{where}: {name} is {size} bytes, over the "
                f"{size_text(MAX_FILE_BYTES)} leger accepts for a file"
            )
    total = sum(sizes.values())
    if total > MAX_TOTAL_BYTES:
        raise SourceError(
            f"{where}: its files are {total} bytes in all, over the "
            f"{size_text(MAX_TOTAL_BYTES)} leger accepts for a deployment"
        )


def _read_bounded(path: Path, limit: int) -> bytes:
    """``path``'s bytes, refused past ``limit`` (it may have grown since it was listed)."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise SourceError(f"{path}: over the {size_text(limit)} leger accepts")
    return data


def from_directory(directory: Path) -> Fetched:
    """A directory with a ``manifest.json`` is verified against it; one without gets a manifest
    built from its quadlet files."""
    if not directory.is_dir():
        raise SourceError(f"{directory} is not a directory")
    manifest_path = directory / MANIFEST_NAME
    if manifest_path.exists():
        manifest = Manifest.model_validate_json(_read_bounded(manifest_path, MAX_MANIFEST_BYTES))
        _check_sizes(str(manifest_path), _sizes(manifest))
        files = {}
        for entry in manifest.files:
            path = directory / entry.path
            if not path.is_file():
                raise SourceError(f"{entry.path} is listed in the manifest but missing")
            data = _read_bounded(path, entry.size)
            verify(entry, data)
            files[entry.path] = data
        return Fetched(manifest, files, str(directory.resolve()))
    paths = [p for p in sorted(directory.iterdir()) if p.is_file() and is_quadlet(p.name)]
    _check_sizes(str(directory), {p.name: p.stat().st_size for p in paths})
    files = {p.name: _read_bounded(p, MAX_FILE_BYTES) for p in paths}
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
