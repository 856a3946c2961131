"""leger's side of the control plane: the stored login and an HTTP client for the Deploy API."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

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


_ERROR_FOR_STATUS: dict[int, type[ControlPlaneError]] = {
    400: RemoteRejected,
    401: AuthError,
    403: AuthError,
    404: RemoteNotFound,
    409: RemoteConflict,
    422: RemoteRejected,
}


def origin(url: httpx.URL | str) -> str:
    """``scheme://host[:port]`` of a URL: the server a message names."""
    url = httpx.URL(str(url))
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def unreachable(server: str, exc: httpx.HTTPError) -> str:
    """One line for a request that got no answer: refused, timed out, broken off."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return f"cannot reach {server.rstrip('/')}: {reason}"


def not_json(response: httpx.Response, expected: str = "JSON") -> str:
    """One line for an answer that is not the API's JSON (an SSO page, a proxy's error), or
    not the ``expected`` other thing."""
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "text/html" or response.content.lstrip()[:1] == b"<":
        what = "an HTML page: a proxy in front?"
    elif response.is_redirect:
        what = f"a redirect to {response.headers.get('location', '?')}: a sign-in proxy in front?"
    else:
        what = f"HTTP {response.status_code}, {kind or 'no content type'}"
    return f"{origin(response.request.url)} did not answer with {expected} ({what})"


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


def _send(http: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ControlPlaneError(unreachable(str(http.base_url), exc)) from None


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

    def get_json(self, path: str) -> Any:
        response = _send(self.http, "GET", path)
        _raise_for(response)
        return json_of(response)

    def get_bytes(self, path: str) -> bytes:
        response = _send(self.http, "GET", path)
        _raise_for(response)
        if response.is_redirect:
            raise ControlPlaneError(not_json(response), response.status_code)
        return response.content


def login_with_tailscale(server: str, client_name: str, *, timeout: float = 15) -> Login | None:
    """Sign in by this host's Tailscale identity; None when the control plane cannot do it for
    this request (not over the tailnet, Tailscale not configured there, no matching user)."""
    server = server.rstrip("/")
    try:
        response = httpx.post(
            server + "/api/v1/deploy/auth/tailscale",
            json={"client_name": client_name},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise ControlPlaneError(unreachable(server, exc)) from None
    if response.status_code in (401, 403, 404, 503):
        return None
    _raise_for(response)
    login = login_with_key(server, json_of(response)["api_key"], timeout=timeout)
    login.method = "tailscale"
    return login


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
        show_code(grant["user_code"], grant["expires_in"])
        deadline = time.monotonic() + grant["expires_in"]
        while time.monotonic() < deadline:
            sleep(grant["interval"])
            poll = {"device_code": grant["device_code"]}
            polled = _send(http, "POST", "/api/v1/deploy/device/token", json=poll)
            _raise_for(polled)
            answer = json_of(polled)
            if answer["status"] == "approved":
                login = login_with_key(server, answer["api_key"], timeout=timeout)
                login.method = "device_code"
                return login
    raise AuthError("the device code expired before anyone approved it")
