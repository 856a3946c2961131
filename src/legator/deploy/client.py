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


class AuthError(RuntimeError):
    pass


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
        try:
            me = http.get("/api/v1/me")
        except httpx.HTTPError as exc:
            raise AuthError(f"cannot reach {server}: {exc}") from None
        if me.status_code == 401:
            raise AuthError("the control plane refused this API key (invalid, expired or revoked)")
        _raise_for(me)
        info = me.json()
        expires_at = None
        if info.get("key_id"):
            keys = http.get("/api/v1/keys")
            _raise_for(keys)
            for key_info in keys.json():
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


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise AuthError(
            f"{response.request.method} {response.url.path}: {response.status_code} {message}"
        )


class ControlPlane:
    def __init__(self, login: Login, *, timeout: float = 30) -> None:
        self.http = httpx.Client(base_url=login.server, timeout=timeout, headers=_auth(login.token))

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def get_json(self, path: str) -> Any:
        response = self.http.get(path)
        _raise_for(response)
        return response.json()

    def get_bytes(self, path: str) -> bytes:
        response = self.http.get(path)
        _raise_for(response)
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
        raise AuthError(f"cannot reach {server}: {exc}") from None
    if response.status_code in (401, 403, 404, 503):
        return None
    _raise_for(response)
    login = login_with_key(server, response.json()["api_key"], timeout=timeout)
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
        try:
            started = http.post("/api/v1/deploy/device/code", json={"client_name": client_name})
        except httpx.HTTPError as exc:
            raise AuthError(f"cannot reach {server}: {exc}") from None
        _raise_for(started)
        grant = started.json()
        show_code(grant["user_code"], grant["expires_in"])
        deadline = time.monotonic() + grant["expires_in"]
        while time.monotonic() < deadline:
            sleep(grant["interval"])
            polled = http.post(
                "/api/v1/deploy/device/token", json={"device_code": grant["device_code"]}
            )
            _raise_for(polled)
            answer = polled.json()
            if answer["status"] == "approved":
                login = login_with_key(server, answer["api_key"], timeout=timeout)
                login.method = "device_code"
                return login
    raise AuthError("the device code expired before anyone approved it")
