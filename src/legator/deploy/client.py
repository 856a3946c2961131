"""leger's side of the control plane: the stored login and an HTTP client for the Deploy API."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from legator.core.bounded_http import (
    BodyTooLarge,
    BodyTooSlow,
    bounded_request,
    not_json,
)
from legator.core.security import write_private_file


class ControlPlaneError(RuntimeError):
    """The control plane could not be reached, or refused or could not answer a request.
    ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(ControlPlaneError):
    """Not logged in, the login expired, or the control plane refused the credentials
    (401, 403)."""


class RemoteNotFound(ControlPlaneError):
    """The control plane has no such thing (404): a configuration version, a rendered file."""


class RemoteRejected(ControlPlaneError):
    """The control plane refused the request as invalid (400, 422): a bad version, say."""


class RemoteConflict(ControlPlaneError):
    """The control plane refused the request as conflicting with its state (409)."""


class AnswerTooLarge(ControlPlaneError):
    """An answer longer than leger accepts for what was asked; refused while it was still
    arriving, so a hostile or broken server cannot make leger hold more than the limit."""


MAX_JSON_BYTES = 4 * 1024 * 1024
"""The most leger reads of a JSON answer: a configuration (its spec is at most 256 KiB),
a manifest, a list of keys."""


_ERROR_FOR_STATUS: dict[int, type[ControlPlaneError]] = {
    400: RemoteRejected,
    401: AuthError,
    403: AuthError,
    404: RemoteNotFound,
    409: RemoteConflict,
    422: RemoteRejected,
}


def unreachable(server: str, exc: httpx.HTTPError) -> str:
    """One line for a request that got no answer: refused, timed out, broken off."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return f"cannot reach {server.rstrip('/')}: {reason}"


def error_message(response: httpx.Response) -> str:
    """The API's message for an error response, or what the answer was instead."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = " ".join(response.text.split())
        return text[:300] if text and not text.startswith("<") else not_json(response)


def json_of(response: httpx.Response) -> Any:
    """The JSON body of a response; ``ControlPlaneError`` when it is not JSON."""
    if response.is_redirect:
        raise ControlPlaneError(not_json(response), response.status_code)
    try:
        return response.json()
    except ValueError:
        raise ControlPlaneError(not_json(response), response.status_code) from None


@dataclass
class Login:
    server: str
    token: str
    method: str
    username: str
    key_id: str | None
    expires_at: str | None  # RFC 3339, or None for a key without expiry
    logged_in_at: str

    @property
    def expired(self) -> bool:
        if not self.expires_at:
            return False
        return datetime.fromisoformat(self.expires_at) <= datetime.now(UTC)

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("token")
        data["expired"] = self.expired
        return data


def load_login(path: Path) -> Login | None:
    try:
        data = json.loads(path.read_text())
        return Login(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise AuthError(f"{path} is damaged ({exc}); run `leger auth login` again") from None


def save_login(path: Path, login: Login) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_file(path, json.dumps(asdict(login), indent=2))


def require_login(path: Path) -> Login:
    login = load_login(path)
    if login is None:
        raise AuthError("not logged in: run `leger auth login --server URL`")
    if login.expired:
        raise AuthError(f"your login expired at {login.expires_at}: run `leger auth login` again")
    return login


def login_with_key(server: str, key: str, *, timeout: float = 15) -> Login:
    server = server.rstrip("/")
    with httpx.Client(base_url=server, timeout=timeout, headers=_auth(key)) as http:
        me = _send(http, "GET", "/api/v1/me")
        if me.status_code == 401:
            raise AuthError(
                "the control plane refused this API key (invalid, expired or revoked)", 401
            )
        _raise_for(me)
        info = json_of(me)
        expires_at = None
        if info.get("key_id"):
            keys = _send(http, "GET", "/api/v1/keys")
            _raise_for(keys)
            for key_info in json_of(keys):
                if key_info["id"] == info["key_id"]:
                    expires_at = key_info.get("expires_at")
    return Login(
        server=server,
        token=key,
        method=info.get("method", "api_key"),
        username=info["username"],
        key_id=info.get("key_id"),
        expires_at=expires_at,
        logged_in_at=datetime.now(UTC).isoformat(),
    )


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _send(
    http: httpx.Client, method: str, path: str, *, limit: int = MAX_JSON_BYTES, **kwargs: Any
) -> httpx.Response:
    """The answer with its body read, at most ``limit`` bytes of it (``AnswerTooLarge``
    beyond) within ``REQUEST_DEADLINE`` seconds: never more than that is held, nor waited
    for, whatever the server sends."""
    try:
        return bounded_request(http, method, path, limit=limit, **kwargs)
    except httpx.HTTPError as exc:
        raise ControlPlaneError(unreachable(str(http.base_url), exc)) from None
    except BodyTooLarge as exc:
        raise AnswerTooLarge(str(exc)) from None
    except BodyTooSlow as exc:
        raise ControlPlaneError(str(exc)) from None


def _raise_for(response: httpx.Response) -> None:
    """An error response as the ``ControlPlaneError`` for its status (``AuthError`` for 401
    and 403, ``RemoteNotFound`` for 404, …), with the server's message."""
    if response.status_code < 400:
        return
    message = error_message(response)
    error = _ERROR_FOR_STATUS.get(response.status_code, ControlPlaneError)
    raise error(
        f"{response.request.method} {response.url.path}: {response.status_code} {message}",
        response.status_code,
    )


class ControlPlane:
    """The Deploy API as the stored login. Every failure is a ``ControlPlaneError``: the
    server out of reach, an answer that is not JSON, or an error status (its subclass)."""

    def __init__(self, login: Login, *, timeout: float = 30) -> None:
        self.http = httpx.Client(base_url=login.server, timeout=timeout, headers=_auth(login.token))

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def get_json(self, path: str, *, limit: int = MAX_JSON_BYTES) -> Any:
        response = _send(self.http, "GET", path, limit=limit)
        _raise_for(response)
        return json_of(response)

    def get_bytes(self, path: str, *, limit: int) -> bytes:
        """The body of ``path``, refused past ``limit`` bytes while it arrives."""
        response = _send(self.http, "GET", path, limit=limit)
        _raise_for(response)
        if response.is_redirect:
            raise ControlPlaneError(not_json(response), response.status_code)
        return response.content


def login_with_tailscale(server: str, client_name: str, *, timeout: float = 15) -> Login | None:
    """Sign in by this host's Tailscale identity; None when the control plane cannot do it for
    this request (not over the tailnet, Tailscale not configured there, no matching user)."""
    server = server.rstrip("/")
    with httpx.Client(base_url=server, timeout=timeout) as http:
        body = {"client_name": client_name}
        response = _send(http, "POST", "/api/v1/deploy/auth/tailscale", json=body)
    if response.status_code in (401, 403, 404, 503):
        return None
    _raise_for(response)
    login = login_with_key(server, json_of(response)["api_key"], timeout=timeout)
    login.method = "tailscale"
    return login


MAX_DEVICE_WAIT = 15 * 60
"""The longest leger waits for a device code's approval, whatever the grant says."""


def _polling(grant: dict[str, Any]) -> tuple[float, int]:
    """Seconds between polls (1 to 60) and seconds to wait in all (at most
    ``MAX_DEVICE_WAIT``): the grant comes from the server and must not make leger poll
    without pause, or wait for years."""
    try:
        interval, expires_in = float(grant["interval"]), int(grant["expires_in"])
        if not math.isfinite(interval):
            raise ValueError(interval)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ControlPlaneError(f"not a device-code grant: {str(grant)[:200]}") from None
    return min(max(interval, 1.0), 60.0), min(max(expires_in, 0), MAX_DEVICE_WAIT)


def login_with_device(
    server: str,
    client_name: str,
    show_code: Callable[[str, int], None],
    *,
    timeout: float = 15,
    sleep: Callable[[float], None] = time.sleep,
) -> Login:
    """Ask for a device code, show the user code, poll until a user approves it in the control
    plane, then log in with the API key it hands out."""
    server = server.rstrip("/")
    with httpx.Client(base_url=server, timeout=timeout) as http:
        started = _send(
            http, "POST", "/api/v1/deploy/device/code", json={"client_name": client_name}
        )
        _raise_for(started)
        grant = json_of(started)
        interval, expires_in = _polling(grant)
        show_code(grant["user_code"], expires_in)
        deadline = time.monotonic() + expires_in
        while time.monotonic() < deadline:
            sleep(interval)
            poll = {"device_code": grant["device_code"]}
            polled = _send(http, "POST", "/api/v1/deploy/device/token", json=poll)
            _raise_for(polled)
            answer = json_of(polled)
            if answer["status"] == "approved":
                login = login_with_key(server, answer["api_key"], timeout=timeout)
                login.method = "device_code"
                return login
    raise AuthError("the device code expired before anyone approved it")
