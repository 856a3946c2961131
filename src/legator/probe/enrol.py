"""``legator-probe init``: trade an enrolment token for an identity (stdlib HTTP only)."""

from __future__ import annotations

import json
import platform
import socket
import urllib.error
import urllib.request
from pathlib import Path

from legator.fleet.protocol import Level
from legator.probe.config import ProbeConfig, save
from legator.probe.version import PROBE_VERSION


class EnrolError(Exception):
    pass


def register(server: str, token: str, *, hostname: str | None, tags: list[str]) -> dict[str, str]:
    body = {
        "token": token,
        "hostname": hostname or socket.gethostname(),
        "os": platform.system().lower(),
        "arch": platform.machine(),
        "version": PROBE_VERSION,
        "tags": tags,
    }
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked by the caller
        server.rstrip("/") + "/api/v1/register",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return json.loads(response.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise EnrolError(f"registration refused ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise EnrolError(f"cannot reach {server}: {exc}") from None


def init(
    server: str,
    token: str,
    config_path: Path,
    *,
    tags: list[str],
    hostname: str | None,
    max_level: Level,
    allow_updates: bool | None = None,
) -> ProbeConfig:
    if not server.startswith(("http://", "https://")):
        raise EnrolError(f"server {server!r} must start with http:// or https://")
    answer = register(server, token, hostname=hostname, tags=tags)
    config = ProbeConfig(
        server=server.rstrip("/"),
        probe_id=answer["probe_id"],
        api_key=answer["api_key"],
        signing_key=answer["signing_key"],
        policy_id=answer.get("policy_id", ""),
        policy_level=max_level,
        allow_updates=allow_updates,
        tags=tags,
    )
    save(config, config_path)
    return config
