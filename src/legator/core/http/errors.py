"""One error shape for every failure: ``{"error": {"code", "message", "request_id"}}``.

Wings with their own wire format (the OpenAI and Anthropic APIs) register a formatter for
their path prefix; no client ever sees a stack trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from legator.core.context import current_request_id
from legator.core.errors import AppError
from legator.core.logging import get_logger

log = get_logger("legator.http")

# (status, code, message, details, headers, request) -> response
ErrorFormatter = Callable[[int, str, str, Any, dict[str, str], Request], Response]

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
}
STATUS_MESSAGES = {
    404: "no such resource",
    405: "method not allowed on this resource",
    413: "request body too large",
}


def default_formatter(
    status: int, code: str, message: str, details: Any, headers: dict[str, str], _request: Request
) -> Response:
    body: dict[str, Any] = {
        "code": code,
        "message": message,
        "request_id": current_request_id(),
    }
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _formatter_for(request: Request) -> ErrorFormatter:
    path = request.url.path
    for prefix, formatter in getattr(request.app.state, "error_formatters", []):
        if path.startswith(prefix):
            return formatter  # type: ignore[no-any-return]
    return default_formatter


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    code = code or STATUS_CODES.get(status, "error")
    return _formatter_for(request)(status, code, message, details, headers or {}, request)


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def validation_details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # The offending input is left out on purpose: it may be a password.
    return [
        {
            "field": _location(tuple(e.get("loc", ()))),
            "message": e["msg"].removeprefix("Value error, "),
        }
        for e in errors
    ]


def install_error_handlers(app: FastAPI) -> None:
    app.state.error_formatters = []

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> Response:
        return error_response(
            request,
            exc.status_code,
            exc.message,
            code=exc.code,
            details=exc.details,
            headers=exc.headers,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else None
        message = STATUS_MESSAGES.get(exc.status_code) or detail or "request failed"
        return error_response(request, exc.status_code, message, headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        details = validation_details(list(exc.errors()))
        first = details[0] if details else {"field": "request", "message": "invalid"}
        message = f"{first['field']}: {first['message']}"
        raw = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in raw):
            return error_response(
                request, 400, "request body is not valid JSON", code="bad_request"
            )
        if any(
            e.get("type") == "model_attributes_type" and tuple(e["loc"]) == ("body",) for e in raw
        ):
            return error_response(
                request, 400, "request body must be a JSON object", code="bad_request"
            )
        return error_response(request, 422, message, details=details)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", path=request.url.path, exc_info=exc)
        return error_response(
            request, 500, "internal error; the request id identifies it in the log"
        )
