"""Background model downloads: progress, cancel, resume after a restart, disk guards.

The transfer itself is a ranged GET written by hand instead of ``hf_hub_download``: we need
byte-level progress for the API and the CLI's bar, cancellation, a destination outside the
HF cache, and resuming a ``.part`` file that a previous control plane left behind. URLs and
metadata still come from ``huggingface_hub`` (``hub.client``).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from legator.core.audit.sanitiser import sanitise_text
from legator.core.errors import AppError, BadRequest, Conflict, NotFound
from legator.core.logging import get_logger
from legator.core.runtime import Core
from legator.gateway.catalog import Catalog
from legator.gateway.gguf import GGUFError, GGUFInfo, read_metadata
from legator.gateway.hub import client
from legator.gateway.models import GatewayDownload
from legator.gateway.schemas import ModelCreate, _slug

log = get_logger("legator.gateway.downloads")
ACTIVE = ("queued", "running")
SAVE_EVERY_S = 1.0
WRITE_BATCH_BYTES = 4 << 20
RETRIES = 5
PART = ".part"
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")
_SLUG_BAD = re.compile(r"[^A-Za-z0-9._:-]+")


def _relative(path: str) -> bool:
    """Whether ``path`` stays inside the folder it is joined to."""
    return (
        bool(path)
        and not path.startswith("/")
        and ".." not in path.split("/")
        and ("\\" not in path)
    )


class OversizedTransfer(Exception):
    """The hub sent more than the size it listed: never retried, the file is dropped."""


class InsufficientStorage(AppError):
    status_code = 507
    code = "insufficient_storage"


class DownloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str = Field(..., description="Hub repository, owner/name.")
    file: str | None = Field(None, max_length=500, description="Default: the repo's only GGUF.")
    revision: str = Field("main", pattern=r"^[A-Za-z0-9._/-]{1,100}$")
    model_id: str | None = Field(None, description="Register the model under this id when done.")
    backend_kind: Literal["process", "podman"] = "process"

    @field_validator("repo")
    @classmethod
    def _check_repo(cls, value: str) -> str:
        if not _REPO.match(value) or ".." in value:
            raise ValueError("expected owner/name")
        return value

    @field_validator("model_id")
    @classmethod
    def _check_model_id(cls, value: str | None) -> str | None:
        # As the catalogue will check it, once the download is complete: refused now instead.
        return None if value is None else _slug(value)

    @field_validator("file")
    @classmethod
    def _check_file(cls, value: str | None) -> str | None:
        if value is not None and not _relative(value):
            raise ValueError("a relative path inside the repository")
        return value

    @field_validator("revision")
    @classmethod
    def _check_revision(cls, value: str) -> str:
        # It names a folder of the download's path too.
        if not _relative(value):
            raise ValueError("a branch, tag or commit, without '..' or a leading '/'")
        return value


class DownloadOut(BaseModel):
    id: str
    repo: str
    filename: str
    revision: str
    state: str
    total_bytes: int
    done_bytes: int
    percent: float
    rate_bytes_s: float
    eta_s: float | None
    error: str
    model_id: str | None
    warning: str = ""


def _model_id_from(filename: str) -> str:
    stem = Path(filename).name.removesuffix(".gguf").removesuffix(".GGUF")
    slug = _SLUG_BAD.sub("-", stem).strip("-._:")[:100].lower()
    return slug or "model"


class Downloads:
    def __init__(self, core: Core, catalog: Catalog, models_dir: Path) -> None:
        self.core = core
        self.catalog = catalog
        self.models_dir = models_dir
        self.refuse_percent = 95.0
        self.warn_percent = 90.0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, int] = {}
        self._rates: dict[str, deque[tuple[float, int]]] = {}
        # Held by a download from its file's final rename until it is registered and marked
        # completed, and by whoever cancels a download (cancel, stop): a cancel never lands in
        # between, where the file would stay on disk with no model pointing at it.
        self._finishing = asyncio.Lock()

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume what was in flight; delete partial files nothing will continue."""
        async with self.core.db.session() as session:
            active = (
                await session.scalars(
                    select(GatewayDownload).where(GatewayDownload.state.in_(ACTIVE))
                )
            ).all()
        keep = {Path(row.dest + PART) for row in active}
        for part in await asyncio.to_thread(lambda: list(self.models_dir.rglob("*" + PART))):
            if part not in keep:
                log.info("removing abandoned partial download", path=str(part))
                part.unlink(missing_ok=True)
        for row in active:
            log.info("resuming download", id=row.id, repo=row.repo, file=row.filename)
            self._launch(row.id)

    async def stop(self) -> None:
        """Interrupt transfers without changing their state: the next start resumes them.
        One being registered finishes first."""
        async with self._finishing:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _launch(self, download_id: str) -> None:
        task = asyncio.ensure_future(self._run(download_id))
        self._tasks[download_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(download_id, None))

    # ----- API -------------------------------------------------------------------------------

    def _out(self, row: GatewayDownload, warning: str = "") -> DownloadOut:
        done = self._done.get(row.id, row.done_bytes) if row.state in ACTIVE else row.done_bytes
        rate = self._rate(row.id) if row.state == "running" else 0.0
        remaining = max(0, row.total_bytes - done)
        return DownloadOut(
            id=row.id,
            repo=row.repo,
            filename=row.filename,
            revision=row.revision,
            state=row.state,
            total_bytes=row.total_bytes,
            done_bytes=done,
            percent=round(done / row.total_bytes * 100, 2) if row.total_bytes else 0.0,
            rate_bytes_s=round(rate, 1),
            eta_s=round(remaining / rate, 1) if rate > 0 and row.state == "running" else None,
            error=row.error,
            model_id=row.model_id,
            warning=warning,
        )

    def _rate(self, download_id: str) -> float:
        samples = self._rates.get(download_id)
        if not samples or len(samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def progress(self) -> dict[str, int]:
        """Bytes received so far by each running download."""
        return dict(self._done)

    async def list(self) -> list[DownloadOut]:
        async with self.core.db.session() as session:
            rows = (
                await session.scalars(
                    select(GatewayDownload).order_by(GatewayDownload.created_at.desc())
                )
            ).all()
        return [self._out(r) for r in rows]

    async def get(self, download_id: str) -> DownloadOut:
        async with self.core.db.session() as session:
            row = await session.get(GatewayDownload, download_id)
        if row is None:
            raise NotFound(f"download {download_id!r} does not exist")
        return self._out(row)

    async def create(self, req: DownloadRequest, *, actor: str) -> DownloadOut:
        listing = await asyncio.to_thread(client.files, req.repo, req.revision)
        filename = req.file or self._only_gguf(req.repo, listing)
        if not _relative(filename):
            raise BadRequest(f"the hub lists a file outside {req.repo}: {filename!r}")
        entry = next((f for f in listing if f.path == filename), None)
        if entry is None:
            raise NotFound(f"{req.repo} has no file {filename!r}")
        if not entry.gguf:
            raise BadRequest(f"{filename}: only .gguf files can be served by llama.cpp")
        if entry.size <= 0:
            # The listed size bounds the transfer (and the disk guard): without one, a broken
            # or hostile hub could stream until the disk is full.
            raise BadRequest(f"{req.repo} lists no size for {filename}; it cannot be fetched")
        model_id = req.model_id or _model_id_from(filename)
        if model_id in self.catalog.models:
            raise Conflict(f"model {model_id!r} already exists; choose another model_id")
        dest = self.models_dir / req.repo.replace("/", "__") / req.revision / filename
        if not dest.resolve().is_relative_to(self.models_dir.resolve()):
            raise BadRequest(f"{filename!r} at revision {req.revision!r} is outside the models")
        if await asyncio.to_thread(dest.exists):
            raise Conflict(f"{req.repo}/{filename} is already downloaded at {dest}")
        async with self.core.db.write() as session:
            active = (
                await session.scalars(
                    select(GatewayDownload).where(GatewayDownload.state.in_(ACTIVE))
                )
            ).all()
            if any(r.dest == str(dest) for r in active):
                raise Conflict(f"{req.repo}/{filename} is already being downloaded")
            if any(r.model_id == model_id for r in active):
                raise Conflict(f"a download for model {model_id!r} is already running")
            promised = sum(
                max(0, r.total_bytes - self._done.get(r.id, r.done_bytes)) for r in active
            )
            warning = self._disk_guard(entry.size, promised)
            row = GatewayDownload(
                repo=req.repo,
                filename=filename,
                revision=req.revision,
                dest=str(dest),
                total_bytes=entry.size,
                model_id=model_id,
                backend_kind=req.backend_kind,
                sha256=entry.sha256,
            )
            session.add(row)
            await session.flush()
            await self.core.audit.record(
                session,
                actor=actor,
                action="gateway.download.create",
                target=f"download:{row.id}",
                details={"repo": req.repo, "file": filename, "bytes": entry.size},
            )
            out = self._out(row, warning)
        self._launch(out.id)
        return out

    @staticmethod
    def _only_gguf(repo: str, listing: list[client.HubFile]) -> str:
        ggufs = [f.path for f in listing if f.gguf]
        if len(ggufs) == 1:
            return ggufs[0]
        if not ggufs:
            raise BadRequest(f"{repo} has no .gguf file")
        raise BadRequest(f"{repo} has several .gguf files; choose one with file: {ggufs}")

    def _disk_guard(self, size: int, promised: int) -> str:
        usage = shutil.disk_usage(self._existing_parent())
        projected = (usage.used + promised + size) / usage.total * 100
        if projected >= self.refuse_percent:
            raise InsufficientStorage(
                f"the download would fill the disk to {projected:.1f}% "
                f"(refused at {self.refuse_percent:g}%; {promised} bytes are promised to "
                "other downloads)"
            )
        if projected >= self.warn_percent:
            log.warning("disk nearly full after download", projected_percent=round(projected, 1))
            return f"the disk will be {projected:.1f}% full after this download"
        return ""

    def _existing_parent(self) -> Path:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        return self.models_dir

    async def cancel(self, download_id: str, *, actor: str) -> DownloadOut:
        # A download being registered finishes first: then it is completed, and a 409 says so.
        async with self._finishing:
            async with self.core.db.write() as session:
                row = await session.get(GatewayDownload, download_id)
                if row is None:
                    raise NotFound(f"download {download_id!r} does not exist")
                if row.state not in ACTIVE:
                    raise Conflict(f"download {download_id!r} is already {row.state}")
                row.state = "cancelled"
                await self.core.audit.record(
                    session,
                    actor=actor,
                    action="gateway.download.cancel",
                    target=f"download:{row.id}",
                )
            task = self._tasks.get(download_id)
            if task is not None:
                task.cancel()  # before the lock is free: it cannot start to finish now
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(Path(row.dest + PART).unlink, missing_ok=True)
        return await self.get(download_id)

    # ----- transfer --------------------------------------------------------------------------

    async def _set(self, download_id: str, **fields: Any) -> GatewayDownload | None:
        async with self.core.db.write() as session:
            row = await session.get(GatewayDownload, download_id)
            if row is None or row.state not in ACTIVE:
                return None  # cancelled meanwhile
            for key, value in fields.items():
                setattr(row, key, value)
            await session.flush()
            session.expunge(row)
        return row

    async def _run(self, download_id: str) -> None:
        row = await self._set(download_id, state="running")
        if row is None:
            return
        dest = Path(row.dest)
        part = Path(row.dest + PART)
        expected_sha = row.sha256 or ""
        try:
            await asyncio.to_thread(part.parent.mkdir, parents=True, exist_ok=True)
            url = client.file_url(row.repo, row.filename, row.revision)
            for attempt in range(RETRIES + 1):
                try:
                    await self._transfer(download_id, url, part, row.total_bytes)
                    break
                except (httpx.HTTPError, OSError) as exc:
                    if attempt == RETRIES or (
                        isinstance(exc, httpx.HTTPStatusError)
                        and exc.response.status_code in (401, 403, 404)
                    ):
                        raise
                    log.info("download interrupted; resuming", id=download_id, error=str(exc))
                    await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
            size = (await asyncio.to_thread(part.stat)).st_size
            if row.total_bytes and size != row.total_bytes:
                raise OSError(f"got {size} bytes, expected {row.total_bytes}")
            if expected_sha and await asyncio.to_thread(_sha256, part) != expected_sha:
                raise OSError("sha256 of the downloaded file does not match the hub's")
            # Checked before it takes its place: a file that is no model must not stay there,
            # where it would make every later download of it a 409.
            info = await asyncio.to_thread(_model_info, part)
            async with self._finishing:  # no cancel from here until it is completed
                if await self._set(download_id) is None:  # cancelled through another replica
                    await asyncio.to_thread(part.unlink, missing_ok=True)
                    return
                await asyncio.to_thread(part.replace, dest)
                try:
                    await asyncio.to_thread(_share_with_backends, dest)
                    model_id = await self._register(row, dest, info)
                except Exception:
                    await asyncio.to_thread(dest.unlink, missing_ok=True)
                    raise
                await self._set(
                    download_id, state="completed", done_bytes=size, error="", model_id=model_id
                )
            await self.core.events.publish(
                "gateway.download.completed", {"id": download_id, "model": model_id}
            )
        except asyncio.CancelledError:
            done = self._done.get(download_id)
            if done is not None:
                await asyncio.shield(self._set(download_id, done_bytes=done))
            raise
        except Exception as exc:
            # The hub's URL may carry a mirror's credentials (HF_ENDPOINT), and httpx names it.
            error = sanitise_text(str(exc))
            log.warning("download failed", id=download_id, error=error)
            await asyncio.to_thread(part.unlink, missing_ok=True)
            await self._set(download_id, state="failed", error=error[:2000])
            # Why it failed is for admins, at /downloads: the event stream reaches viewers.
            await self.core.events.publish("gateway.download.failed", {"id": download_id})
        finally:
            self._done.pop(download_id, None)
            self._rates.pop(download_id, None)

    async def _transfer(self, download_id: str, url: str, part: Path, total: int) -> None:
        have = await asyncio.to_thread(_size, part)
        if total and have >= total:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        token = client.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        rates = self._rates.setdefault(download_id, deque(maxlen=20))
        timeout = httpx.Timeout(30.0, read=60.0)
        async with (
            httpx.AsyncClient(follow_redirects=True, timeout=timeout) as http,
            http.stream("GET", url, headers=headers) as response,
        ):
            response.raise_for_status()
            if have and response.status_code != 206:
                have = 0  # the server ignored the range: start over
            mode = "ab" if have else "wb"
            done = have
            saved = time.monotonic()
            # Written in batches by a thread: a write may wait for the disk (the kernel
            # throttles a writer with too many dirty pages), which the event loop must not.
            pending = bytearray()
            with part.open(mode, buffering=0) as sink:
                try:
                    async for chunk in response.aiter_bytes():
                        if total and done + len(chunk) > total:
                            raise OversizedTransfer(
                                f"the hub sent more than the {total} bytes it listed"
                            )
                        pending += chunk
                        done += len(chunk)
                        self._done[download_id] = done
                        now = time.monotonic()
                        rates.append((now, done))
                        if len(pending) >= WRITE_BATCH_BYTES or now - saved >= SAVE_EVERY_S:
                            await asyncio.to_thread(sink.write, bytes(pending))
                            pending.clear()
                        if now - saved >= SAVE_EVERY_S:
                            saved = now
                            if await self._set(download_id, done_bytes=done) is None:
                                raise asyncio.CancelledError
                finally:
                    sink.write(pending)  # at most one batch; a resume starts from the file
        if total and done < total:
            raise httpx.ReadError(f"connection closed at {done} of {total} bytes")

    async def _register(self, row: GatewayDownload, dest: Path, info: GGUFInfo) -> str | None:
        if not row.model_id or row.model_id in self.catalog.models:
            return None
        context = min(4096, info.context_length or 4096)
        await self.catalog.create_model(
            ModelCreate(
                id=row.model_id,
                name=info.name or row.model_id,
                source_repo=row.repo,
                backend_kind=row.backend_kind,  # type: ignore[arg-type]
                model_path=str(dest),
                context_length=context,
            ),
            actor="system:gateway",
        )
        return row.model_id


def _model_info(path: Path) -> GGUFInfo:
    try:
        return read_metadata(path)
    except GGUFError as exc:
        raise OSError(str(exc)) from None


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _share_with_backends(model: Path) -> None:
    """A Podman backend runs as an unprivileged user of its own, with the model's directory
    mounted: the file and that directory must be readable by others, whatever the umask (the
    packaged unit's is 0077). The directories above stay as they are (the data directory is
    0700), so only that mount reaches them."""
    model.chmod(0o644)
    model.parent.chmod(0o755)
