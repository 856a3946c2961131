"""A Python client of the setec API, for legerd (TCP or its unix socket) and for the control
plane's ``/api/v1/secrets`` mount (same calls, bearer key)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from legator.core.bounded_http import (
    BodyTooLarge,
    BodyTooSlow,
    bounded_request,
    not_json,
)
from legator.secrets.errors import (
    AccessDenied,
    InvalidRequest,
    SecretNotFound,
    SecretsError,
    VersionClaimed,
)
from legator.secrets.store import SecretInfo

T = TypeVar("T")

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


class BadAnswer(SecretsError):
    """An answer that is not the call's: not JSON (a proxy's sign-in page), or JSON of
    another shape."""

    status_code = 502
    message = "not a setec answer"


class AnswerTooLarge(SecretsError):
    """An answer longer than any the call can have; refused while it was still arriving."""

    status_code = 502
    message = "answer too large"


MAX_LIST_BYTES = 16 * 1024 * 1024
"""The most read of a list: about 200,000 secrets as names are usually written, or the
10,000 legerd lets one writer create with 512-byte names and 90 versions each."""
MAX_ANSWER_BYTES = 4 * 1024 * 1024
"""The most read of any other answer: the largest is a 1 MiB value, base64 in JSON."""


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

    def call(
        self, method: str, body: dict[str, Any], *, limit: int = MAX_ANSWER_BYTES
    ) -> httpx.Response:
        response = self._post(method, body, limit)
        for _ in range(RETRIES):
            wait = _retry_after(response) if response.status_code == 429 else None
            if wait is None:
                break
            time.sleep(wait)
            response = self._post(method, body, limit)
        if response.status_code in (200, 304):
            return response
        error = _BY_STATUS.get(response.status_code, SecretsError)
        message = _error_message(response) or error.message
        raise error(f"{method}: {message} (HTTP {response.status_code})")

    def _post(self, method: str, body: dict[str, Any], limit: int) -> httpx.Response:
        return self._send("POST", f"{self.prefix}/{method}", limit, "the secrets server", body)

    def _send(
        self, method: str, path: str, limit: int, server: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        """The answer, its body read as it arrives: at most ``limit`` bytes of it, within
        ``bounded_http.REQUEST_DEADLINE`` (the timeout bounds each wait for bytes only)."""
        try:
            return bounded_request(self._http, method, path, limit=limit, json=body)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach {server} at {self.where}: {exc}") from None
        except BodyTooLarge as exc:
            raise AnswerTooLarge(f"{self.where}: {exc}") from None
        except BodyTooSlow as exc:
            # As good as out of reach, like a timeout.
            raise Unavailable(f"{self.where}: {exc}") from None

    def whoami(self) -> str:
        """The control plane's name for this client's API key (control plane only)."""
        response = self._send("GET", "/api/v1/me", MAX_ANSWER_BYTES, "the control plane")
        if response.status_code != 200:
            error = _BY_STATUS.get(response.status_code, SecretsError)
            raise error(f"me: {_error_message(response)} (HTTP {response.status_code})")
        return self._parsed(response, lambda body: str(body["username"]))

    def _parsed(self, response: httpx.Response, read: Callable[[Any], T]) -> T:
        """``read`` of the JSON body; ``BadAnswer`` naming the server and path when the body
        is not JSON or not of the shape ``read`` expects."""
        try:
            body = response.json()
        except ValueError:
            raise BadAnswer(not_json(response)) from None
        try:
            return read(body)
        except (KeyError, TypeError, ValueError) as exc:
            where = f"{response.request.method} {response.request.url.path}"
            raise BadAnswer(
                f"{self.where}: {where}: not the answer the call expects ({exc!r})"
            ) from None

    # the calls

    def list(self) -> list[SecretInfo]:
        response = self.call("list", {}, limit=MAX_LIST_BYTES)
        return self._parsed(response, lambda body: [_info(i) for i in body])

    def get(self, name: str, version: int = 0) -> tuple[bytes, int]:
        return self._parsed(self.call("get", {"Name": name, "Version": version}), _value)

    def get_if_changed(self, name: str, version: int) -> tuple[bytes, int] | None:
        """The active value, or None when the active version is still ``version``."""
        response = self.call("get", {"Name": name, "Version": version, "UpdateIfChanged": True})
        if response.status_code == 304:
            return None
        return self._parsed(response, _value)

    def info(self, name: str) -> SecretInfo:
        return self._parsed(self.call("info", {"Name": name}), _info)

    def put(self, name: str, value: bytes) -> int:
        return self._parsed(self.call("put", {"Name": name, "Value": _b64(value)}), int)

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


def _value(body: dict[str, Any]) -> tuple[bytes, int]:
    return base64.b64decode(body["Value"], validate=True), int(body["Version"])


def _info(body: dict[str, Any]) -> SecretInfo:
    return SecretInfo(
        body["Name"], [int(v) for v in body.get("Versions") or []], int(body["ActiveVersion"])
    )
