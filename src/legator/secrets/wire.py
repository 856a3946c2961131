"""setec's JSON shapes: request parsing and response bodies, shared by every mount."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from legator.secrets.errors import InvalidRequest
from legator.secrets.store import SecretInfo


def info_json(info: SecretInfo) -> dict[str, Any]:
    return {"Name": info.name, "Versions": info.versions, "ActiveVersion": info.active_version}


def value_json(value: bytes, version: int) -> dict[str, Any]:
    return {"Value": base64.b64encode(value).decode(), "Version": version}


def field_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise InvalidRequest(f"bad request: {key} must be a string")
    return value


def field_int(body: dict[str, Any], key: str) -> int:
    value = body.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"bad request: {key} must be a non-negative integer")
    return value


def field_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"bad request: {key} must be a boolean")
    return value


def field_bytes(body: dict[str, Any], key: str) -> bytes:
    """A Go ``[]byte`` field: standard base64 (null or absent: empty)."""
    value = body.get(key)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise InvalidRequest(f"bad request: {key} must be base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"bad request: {key} is not valid base64") from None
