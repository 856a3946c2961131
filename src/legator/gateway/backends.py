"""Backends: where a model's requests go. This issue has ``external`` (a URL the operator
runs); managed runtimes plug in through ``BackendRegistry.factories``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import aiohttp

from legator.gateway.schemas import ModelOut

# aiohttp rather than httpx for the upstream leg: measured on this machine against the same
# upstream, httpx's pool fell to ~300-750 requests/s at 64 concurrent requests where aiohttp
# did 4,000-6,000 (bench/gateway.py). Up to 4,096 connections: 1,000 streams must not queue.
_CONNECTIONS = 4096
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5.0, sock_connect=5.0, sock_read=600.0)


class Backend(ABC):
    """An OpenAI-compatible server for one model."""

    def __init__(self, model: ModelOut) -> None:
        self.model = model

    @property
    @abstractmethod
    def base_url(self) -> str: ...

    @property
    def ready(self) -> bool:
        return self.model.state == "ready"

    def headers(self) -> dict[str, str]:
        return {}

    async def close(self) -> None:
        return None


class ExternalBackend(Backend):
    @property
    def base_url(self) -> str:
        return self.model.backend_url


BackendFactory = Callable[[ModelOut], Backend]


class BackendRegistry:
    """One backend per catalogued model and one shared HTTP client for all of them."""

    def __init__(self) -> None:
        self.factories: dict[str, BackendFactory] = {"external": ExternalBackend}
        self.backends: dict[str, Backend] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created on first use: an aiohttp session belongs to the running event loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=_CONNECTIONS, limit_per_host=0),
                timeout=_TIMEOUT,
                # Bodies are relayed and size-capped as they come: ask for them uncompressed
                # (aiohttp would otherwise offer gzip, and a compressing backend's answer
                # would read as garbage).
                auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self._session

    def get(self, model: ModelOut) -> Backend:
        backend = self.backends.get(model.id)
        # Identity first: the catalogue hands out the same model object until it changes.
        if backend is None or (backend.model is not model and backend.model != model):
            factory = self.factories.get(model.backend_kind)
            if factory is None:
                raise LookupError(f"no runtime for backend kind {model.backend_kind!r}")
            backend = factory(model)
            self.backends[model.id] = backend
        return backend

    def forget(self, model_id: str) -> None:
        self.backends.pop(model_id, None)

    async def post(
        self, backend: Backend, path: str, body: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        """Send; the caller reads or releases the response. A redirect is not followed: it
        would have this host fetch an address of the backend's choosing (loopback, a cloud
        metadata service) for the client to read."""
        return await self.session.post(
            backend.base_url + path, json=body, headers=backend.headers(), allow_redirects=False
        )

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()
        if self._session is not None:
            await self._session.close()
