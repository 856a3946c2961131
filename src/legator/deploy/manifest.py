"""``manifest.json``: what a rendered configuration contains, with a checksum per file."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST_NAME = "manifest.json"
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,200}\Z")
_SHA = re.compile(r"^[0-9a-f]{64}\Z")


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        # A manifest comes over the network: a path must never leave the target directory.
        if not _FILE.match(value) or value == MANIFEST_NAME:
            raise ValueError(f"{value!r} is not a plain file name")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if not _SHA.match(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0)
    created_at: datetime
    files: list[ManifestFile]
    secrets_required: list[str] = Field(default_factory=list)
    services: list[str] = Field(default_factory=list)

    @field_validator("files")
    @classmethod
    def _unique(cls, value: list[ManifestFile]) -> list[ManifestFile]:
        paths = [f.path for f in value]
        if len(set(paths)) != len(paths):
            raise ValueError("a file is listed twice")
        return value


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_manifest(
    files: dict[str, bytes],
    *,
    version: int,
    created_at: datetime,
    secrets: list[str],
    services: list[str],
) -> Manifest:
    return Manifest(
        version=version,
        created_at=created_at,
        files=[
            ManifestFile(path=path, sha256=sha256_bytes(data), size=len(data))
            for path, data in sorted(files.items())
        ],
        secrets_required=sorted(set(secrets)),
        services=services,
    )


class ChecksumMismatch(ValueError):
    pass


def verify(entry: ManifestFile, data: bytes) -> None:
    if len(data) != entry.size:
        raise ChecksumMismatch(f"{entry.path}: size {len(data)}, manifest says {entry.size}")
    digest = sha256_bytes(data)
    if digest != entry.sha256:
        raise ChecksumMismatch(f"{entry.path}: sha256 {digest}, manifest says {entry.sha256}")
