"""Backends: where a model's requests go. This issue has ``external`` (a URL the operator
runs); managed runtimes plug in through ``BackendRegistry.factories``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import httpx

from legator.gateway.schemas import ModelOut

# Generous pools: 1,000 concurrent streams must not queue inside httpx.
_LIMITS = httpx.Limits(max_connections=4096, max_keepalive_connections=512)
_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=30.0)


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
        self.client = httpx.AsyncClient(limits=_LIMITS, timeout=_TIMEOUT, http2=False)

    def get(self, model: ModelOut) -> Backend:
        backend = self.backends.get(model.id)
        if backend is None or backend.model != model:
            factory = self.factories.get(model.backend_kind)
            if factory is None:
                raise LookupError(f"no runtime for backend kind {model.backend_kind!r}")
            backend = factory(model)
            self.backends[model.id] = backend
        return backend

    def forget(self, model_id: str) -> None:
        self.backends.pop(model_id, None)

    def build(self, backend: Backend, path: str, body: dict[str, Any]) -> httpx.Request:
        return self.client.build_request(
            "POST", backend.base_url + path, json=body, headers=backend.headers()
        )

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()
        await self.client.aclose()
