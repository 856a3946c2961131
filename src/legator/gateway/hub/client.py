"""Search and file listings through ``huggingface_hub``. The endpoint and token are read from
``HF_ENDPOINT`` / ``HF_TOKEN`` at each call (the library reads them once at import)."""

from __future__ import annotations

import itertools
import os
import socket
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from pydantic import BaseModel

from legator.core.audit.sanitiser import sanitise_text
from legator.core.errors import NotFound, ServiceUnavailable
from legator.core.security import mask_url

DEFAULT_ENDPOINT = "https://huggingface.co"
REACH_TIMEOUT_S = 5.0


class HubModel(BaseModel):
    id: str
    downloads: int | None = None
    likes: int | None = None
    pipeline_tag: str | None = None
    tags: list[str] = []
    gated: bool | str | None = None


class HubFile(BaseModel):
    path: str
    size: int
    gguf: bool
    sha256: str | None = None


def _shown() -> str:
    """The endpoint as errors name it: a mirror's credentials masked."""
    return mask_url(endpoint())


def _said(exc: Exception) -> str:
    return sanitise_text(str(exc))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def api() -> HfApi:
    return HfApi(endpoint=endpoint(), token=token() or False)


def file_url(repo: str, filename: str, revision: str) -> str:
    return hf_hub_url(repo, filename, revision=revision, endpoint=endpoint())


def _check_reachable() -> None:
    """Fail fast when the hub cannot be reached at all: the library would retry a refused or
    unresolvable connection five times with back-off (about 23 s) before giving up."""
    url = urlsplit(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise ServiceUnavailable(f"cannot reach the hub at {_shown()}: {_said(exc)}") from None


def search(
    q: str | None, *, task: str | None, gguf: bool, limit: int, offset: int
) -> list[HubModel]:
    """Blocking; run in a thread. The hub pages by cursor, so ``offset`` skips results."""
    _check_reachable()
    try:
        found = api().list_models(
            search=q or None,
            pipeline_tag=task or None,
            filter="gguf" if gguf else None,
            limit=offset + limit,
        )
        return [
            HubModel(
                id=m.id,
                downloads=m.downloads,
                likes=m.likes,
                pipeline_tag=m.pipeline_tag,
                tags=list(m.tags or []),
                gated=m.gated,
            )
            for m in itertools.islice(found, offset, offset + limit)
        ]
    except HfHubHTTPError as exc:
        raise ServiceUnavailable(f"hub search failed: {_reason(exc)}") from None
    except Exception as exc:  # the library's network layer differs between its versions
        raise ServiceUnavailable(f"cannot reach the hub at {_shown()}: {_said(exc)}") from None


def files(repo: str, revision: str = "main") -> list[HubFile]:
    """Blocking; every file of ``repo`` with its size."""
    _check_reachable()
    try:
        entries = api().list_repo_tree(repo, recursive=True, revision=revision)
        out = []
        for entry in entries:
            if not isinstance(entry, RepoFile):
                continue
            out.append(
                HubFile(
                    path=entry.path,
                    size=int(entry.size or 0),
                    gguf=entry.path.lower().endswith(".gguf"),
                    sha256=entry.lfs.sha256 if entry.lfs else None,
                )
            )
        return sorted(out, key=lambda f: f.path)
    except RepositoryNotFoundError:
        raise NotFound(f"repository {repo!r} does not exist on {_shown()}") from None
    except HfHubHTTPError as exc:
        if _reason(exc) == 404:  # a revision or path the repository does not have
            raise NotFound(f"{repo!r} has no revision {revision!r} on {_shown()}") from None
        raise ServiceUnavailable(f"hub listing failed: {_reason(exc)}") from None
    except Exception as exc:  # the library's network layer differs between its versions
        raise ServiceUnavailable(f"cannot reach the hub at {_shown()}: {_said(exc)}") from None


def _reason(exc: HfHubHTTPError) -> Any:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) or str(exc).splitlines()[0]
