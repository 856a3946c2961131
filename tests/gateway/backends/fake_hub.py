"""A local stand-in for the Hugging Face hub (it cannot be reached here), speaking the parts
of its HTTP API that ``huggingface_hub`` and the downloader use: ``GET /api/models`` (search),
``GET /api/models/{repo}/tree/{revision}`` (file listing), and ``HEAD``/``GET
/{repo}/resolve/{revision}/{file}`` with ``Range`` support. Knobs make a transfer drop the
connection part-way, or trickle slowly so a test can restart the control plane mid-download.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import free_port


@dataclass
class HubRepo:
    id: str
    files: dict[str, bytes]
    tags: list[str] = field(default_factory=lambda: ["gguf", "text-generation"])
    pipeline_tag: str = "text-generation"
    downloads: int = 0


@dataclass
class FakeHub:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    drop_after: int | None = None  # the next transfer closes the connection after N bytes
    trickle: tuple[int, float] | None = None  # (bytes, seconds) per chunk
    ranges: list[str] = field(default_factory=list)  # Range headers of GET requests seen
    pad: int = 0  # a broken or hostile hub: transfers send this many bytes more than listed
    gone: set[str] = field(default_factory=set)  # files listed whose transfer answers 404
    sent: int = 0  # bytes of file bodies sent so far
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo: str, files: dict[str, bytes], **kw: object) -> None:
        self.repos[repo] = HubRepo(repo, files, **kw)  # type: ignore[arg-type]

    # ----- routes ----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        q = (request.query_params.get("search") or "").lower()
        wanted = request.query_params.getlist("filter")
        task = request.query_params.get("pipeline_tag")
        limit = int(request.query_params.get("limit") or 1000)
        found = [
            {
                "_id": hashlib.sha256(r.id.encode()).hexdigest()[:24],
                "id": r.id,
                "modelId": r.id,
                "downloads": r.downloads,
                "likes": 0,
                "tags": r.tags,
                "pipeline_tag": r.pipeline_tag,
                "private": False,
            }
            for r in sorted(self.repos.values(), key=lambda r: -r.downloads)
            if q in r.id.lower()
            and all(w in r.tags for w in wanted)
            and (task is None or r.pipeline_tag == task)
        ]
        return JSONResponse(found[:limit])

    async def tree(self, request: Request) -> Response:
        repo = self.repos.get(f"{request.path_params['owner']}/{request.path_params['name']}")
        if repo is None:
            return JSONResponse(
                {"error": "Repository not found"},
                status_code=404,
                headers={"X-Error-Code": "RepoNotFound"},
            )
        if request.path_params["revision"] != "main":
            return JSONResponse(
                {"error": "Invalid rev id"},
                status_code=404,
                headers={"X-Error-Code": "RevisionNotFound"},
            )
        return JSONResponse(
            [
                {
                    "type": "file",
                    "path": path,
                    "size": len(data),
                    "oid": hashlib.sha1(data, usedforsecurity=False).hexdigest(),
                    "lfs": {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    },
                }
                for path, data in sorted(repo.files.items())
            ]
        )

    async def resolve(self, request: Request) -> Response:
        repo = self.repos.get(f"{request.path_params['owner']}/{request.path_params['name']}")
        data = repo.files.get(request.path_params["file"]) if repo else None
        if data is None or request.path_params["file"] in self.gone:
            return JSONResponse(
                {"error": "Entry not found"},
                status_code=404,
                headers={"X-Error-Code": "EntryNotFound"},
            )
        etag = hashlib.sha256(data).hexdigest()
        headers = {
            "ETag": f'"{etag}"',
            "X-Repo-Commit": "0" * 40,
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            return Response(headers={**headers, "Content-Length": str(len(data))})
        header = request.headers.get("range", "")
        self.ranges.append(header)
        start = 0
        if header.startswith("bytes="):
            start = int(header[6:].split("-")[0])
        body = data[start:] + b"\0" * self.pad
        status = 206 if header else 200
        if header:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        drop, self.drop_after = self.drop_after, None
        return StreamingResponse(
            self._stream(body, drop), status_code=status, headers=headers, media_type=None
        )

    async def _stream(self, body: bytes, drop: int | None) -> AsyncIterator[bytes]:
        step, pause = self.trickle or (64 * 1024, 0.0)
        sent = 0
        while sent < len(body):
            piece = body[sent : sent + step]
            if drop is not None and sent + len(piece) > drop:
                yield piece[: drop - sent]
                raise ConnectionResetError("fake hub: transfer interrupted")
            yield piece
            sent += len(piece)
            self.sent += len(piece)
            if pause:
                await asyncio.sleep(pause)

    # ----- server ----------------------------------------------------------------------------

    def start(self) -> FakeHub:
        app = Starlette(
            routes=[
                Route("/api/models", self.models),
                Route("/api/models/{owner}/{name}/tree/{revision}", self.tree),
                Route(
                    "/{owner}/{name}/resolve/{revision}/{file:path}",
                    self.resolve,
                    methods=["GET", "HEAD"],
                ),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "fake hub did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def gguf_bytes(path: Path) -> bytes:
    return path.read_bytes()
