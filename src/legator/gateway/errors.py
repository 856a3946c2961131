"""Error bodies in the OpenAI and Anthropic wire formats, for ``/v1/*`` and ``/v1/messages``."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from legator.core.errors import AppError

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "server_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def openai_error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "api_error"),
            "param": None,
            "code": code,
        }
    }


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
    }


def _wire_status(status: int) -> int:
    # Field validation failures are a client's malformed request: 400, as OpenAI answers.
    return 400 if status == 422 else status


def openai_formatter(
    status: int, code: str, message: str, details: Any, headers: dict[str, str], _r: Request
) -> Response:
    if isinstance(details, dict) and details.get("code"):
        code = details["code"]
    status = _wire_status(status)
    return JSONResponse(openai_error_body(status, message, code), status, headers=headers)


def anthropic_formatter(
    status: int, code: str, message: str, details: Any, headers: dict[str, str], _r: Request
) -> Response:
    status = _wire_status(status)
    return JSONResponse(anthropic_error_body(status, message), status, headers=headers)


class UpstreamError(AppError):
    """The backend failed (connection refused, 5xx, garbage): the client gets 502; or it
    refused the request (400) or is rate limited (429, with its ``Retry-After``)."""

    status_code = 502
    code = "bad_gateway"

    def __init__(
        self, message: str, status: int = 502, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, headers=headers)
        self.status_code = status
        self.code = {502: "bad_gateway", 429: "rate_limit_exceeded"}.get(status, "bad_request")

    @property
    def status(self) -> int:
        return self.status_code
