"""Liveness, readiness, version, metrics and the API documentation."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from legator.core.auth.permissions import Permission
from legator.core.errors import ServiceUnavailable
from legator.core.http.deps import Require, core_of, require
from legator.core.version import build_info

router = APIRouter(tags=["system"])
OPENAPI_PATH = "/api/v1/openapi.json"


@router.get("/healthz", response_class=PlainTextResponse, dependencies=[require(Permission.PUBLIC)])
async def healthz() -> str:
    """Liveness: the process answers."""
    return "ok"


@router.get("/readyz", response_class=PlainTextResponse, dependencies=[require(Permission.PUBLIC)])
async def readyz(request: Request) -> str:
    """Readiness: the database answers."""
    if not await core_of(request).db.ping():
        raise ServiceUnavailable("database unreachable")
    return "ready"


@router.get("/version", dependencies=[require(Permission.PUBLIC)])
async def version() -> dict[str, str]:
    return build_info()


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[require(Permission.PUBLIC)])
async def metrics(request: Request) -> Response:
    """Prometheus metrics; needs ``metrics:read`` unless LEGATOR_METRICS_PUBLIC is true."""
    core = core_of(request)
    if not core.settings.metrics_public:
        await Require(Permission.METRICS_READ)(request)
    return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(OPENAPI_PATH, include_in_schema=False, dependencies=[require(Permission.PUBLIC)])
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/api/v1/docs", include_in_schema=False, dependencies=[require(Permission.PUBLIC)])
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=OPENAPI_PATH, title="Legator API")
