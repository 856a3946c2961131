"""A Python client of the setec API, for legerd (TCP or its unix socket) and for the control
plane's ``/api/v1/secrets`` mount (same calls, bearer key)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import httpx

from legator.secrets.errors import (
    AccessDenied,
    InvalidRequest,
    SecretNotFound,
    SecretsError,
    VersionClaimed,
)
from legator.secrets.store import SecretInfo

_BY_STATUS: dict[int, type[SecretsError]] = {
    400: InvalidRequest,
    401: AccessDenied,
    403: AccessDenied,
    404: SecretNotFound,
    412: VersionClaimed,
}


# A throttled call (429) is retried after the server's Retry-After when that is this short.
RETRY_AFTER_MAX_S = 5
RETRIES = 3


def _retry_after(response: httpx.Response) -> int | None:
    text = response.headers.get("retry-after", "")
    return int(text) if text.isdigit() and int(text) <= RETRY_AFTER_MAX_S else None


class Unavailable(SecretsError):
    status_code = 503
    message = "secrets server unavailable"


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message", ""))
    except ValueError:
        pass
    return response.text.strip()[:500]


class Client:
    """``Client("http://host:8573")``, ``Client(socket_path="/run/legerd/legerd.sock")``, or
    ``Client("https://legator.example", api_key="lgk_…", prefix="/api/v1/secrets")``."""

    def __init__(
        self,
        server: str | None = None,
        *,
        socket_path: str | Path | None = None,
        api_key: str | None = None,
        prefix: str = "/api",
        timeout: float = 10.0,
    ) -> None:
        if (server is None) == (socket_path is None):
            raise ValueError("give exactly one of a server URL or a unix socket path")
        headers = {
            "Content-Type": "application/json",
            "Sec-X-Tailscale-No-Browsers": "setec",
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        transport = httpx.HTTPTransport(uds=str(socket_path)) if socket_path else None
        self.where = str(socket_path or server)
        self.prefix = prefix.rstrip("/")
        self._http = httpx.Client(
            base_url=server or "http://legerd",
            transport=transport,
            headers=headers,
            timeout=timeout,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, body: dict[str, Any]) -> httpx.Response:
        response = self._post(method, body)
        for _ in range(RETRIES):
            wait = _retry_after(response) if response.status_code == 429 else None
            if wait is None:
                break
            time.sleep(wait)
            response = self._post(method, body)
        if response.status_code in (200, 304):
            return response
        error = _BY_STATUS.get(response.status_code, SecretsError)
        message = _error_message(response) or error.message
        raise error(f"{method}: {message} (HTTP {response.status_code})")

    def _post(self, method: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return self._http.post(f"{self.prefix}/{method}", json=body)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach the secrets server at {self.where}: {exc}") from None

    def whoami(self) -> str:
        """The control plane's name for this client's API key (control plane only)."""
        try:
            response = self._http.get("/api/v1/me")
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach the control plane at {self.where}: {exc}") from None
        if response.status_code != 200:
            error = _BY_STATUS.get(response.status_code, SecretsError)
            raise error(f"me: {_error_message(response)} (HTTP {response.status_code})")
        return str(response.json()["username"])

    # the calls

    def list(self) -> list[SecretInfo]:
        return [_info(i) for i in self.call("list", {}).json()]

    def get(self, name: str, version: int = 0) -> tuple[bytes, int]:
        body = self.call("get", {"Name": name, "Version": version}).json()
        return base64.b64decode(body["Value"]), int(body["Version"])

    def get_if_changed(self, name: str, version: int) -> tuple[bytes, int] | None:
        """The active value, or None when the active version is still ``version``."""
        response = self.call("get", {"Name": name, "Version": version, "UpdateIfChanged": True})
        if response.status_code == 304:
            return None
        body = response.json()
        return base64.b64decode(body["Value"]), int(body["Version"])

    def info(self, name: str) -> SecretInfo:
        return _info(self.call("info", {"Name": name}).json())

    def put(self, name: str, value: bytes) -> int:
        return int(self.call("put", {"Name": name, "Value": _b64(value)}).json())

    def activate(self, name: str, version: int) -> None:
        self.call("activate", {"Name": name, "Version": version})

    def delete(self, name: str) -> None:
        self.call("delete", {"Name": name})

    def delete_version(self, name: str, version: int) -> None:
        self.call("delete-version", {"Name": name, "Version": version})

    def create_version(self, name: str, version: int, value: bytes) -> None:
        self.call("create-version", {"Name": name, "Version": version, "Value": _b64(value)})


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _info(body: dict[str, Any]) -> SecretInfo:
    return SecretInfo(
        body["Name"], [int(v) for v in body.get("Versions") or []], int(body["ActiveVersion"])
    )
