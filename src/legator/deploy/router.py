"""``/api/v1/deploy``: the catalogue, configuration versions and rendered files."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.errors import NotFound
from legator.core.http.deps import core_of, require
from legator.core.http.net import client_ip, peer_ip
from legator.deploy.configs import LIST_LIMIT, LIST_MAX_LIMIT, ConfigService, catalog_entries
from legator.deploy.device import DeviceLogins
from legator.deploy.manifest import MANIFEST_NAME
from legator.deploy.schemas import (
    CatalogEntry,
    ConfigCreate,
    ConfigDiff,
    ConfigOut,
    DeviceApprove,
    DevicePoll,
    DeviceStart,
)

router = APIRouter(prefix="/api/v1/deploy", tags=["deploy"])


def _service(request: Request) -> ConfigService:
    return request.app.state.deploy_configs  # type: ignore[no-any-return]


@router.get(
    "/catalog", response_model=list[CatalogEntry], dependencies=[require(Permission.DEPLOY_READ)]
)
async def catalog() -> list[dict[str, object]]:
    """Every service a configuration can pick, with its options schema and secrets."""
    return catalog_entries()


@router.post("/configs", response_model=ConfigOut, status_code=201)
async def save_config(
    body: ConfigCreate, request: Request, principal: Principal = require(Permission.DEPLOY_WRITE)
) -> ConfigOut:
    """Save a new version. It is validated against each service's options schema; errors
    name the field (``details`` lists them all). At most 256 services (422 beyond)."""
    return await _service(request).save(principal, body.spec, body.comment)


@router.get("/configs", response_model=list[ConfigOut])
async def list_configs(
    request: Request,
    principal: Principal = require(Permission.DEPLOY_READ),
    limit: int = Query(LIST_LIMIT, ge=1, le=LIST_MAX_LIMIT, description="Versions per page."),
    before: int | None = Query(
        None, ge=1, description="Only versions below this one: the next page after the last."
    ),
) -> list[ConfigOut]:
    """Your saved versions, newest first, a page at a time."""
    return await _service(request).list(principal, limit=limit, before=before)


@router.get("/configs/{version}", response_model=ConfigOut)
async def get_config(
    version: str, request: Request, principal: Principal = require(Permission.DEPLOY_READ)
) -> ConfigOut:
    """One version, or ``latest``."""
    return await _service(request).get(principal, version)


@router.get("/configs/{version}/diff/{other}", response_model=ConfigDiff)
async def diff_configs(
    version: str,
    other: str,
    request: Request,
    principal: Principal = require(Permission.DEPLOY_READ),
) -> ConfigDiff:
    """Unified diffs of the spec and of the rendered files from ``version`` to ``other``. A file
    too large to diff is reported as ``Files A and B differ (too large to diff ...)``."""
    return await _service(request).diff(principal, version, other)


@router.get("/rendered/{version}/{path}")
async def rendered_file(
    version: str,
    path: str,
    request: Request,
    principal: Principal = require(Permission.DEPLOY_READ),
) -> Response:
    """``manifest.json`` or one rendered quadlet file of a version (or ``latest``)."""
    rendered = await _service(request).rendered(principal, version)
    if path == MANIFEST_NAME:
        return Response(rendered.manifest.model_dump_json(indent=2), media_type="application/json")
    data = rendered.files.get(path)
    if data is None:
        raise NotFound(f"version {rendered.manifest.version} has no file {path!r}")
    return Response(data, media_type="text/plain; charset=utf-8")


def _devices(request: Request) -> DeviceLogins:
    return request.app.state.deploy_devices  # type: ignore[no-any-return]


@router.post("/auth/tailscale", dependencies=[require(Permission.PUBLIC)])
async def tailscale_login(body: DeviceStart, request: Request) -> dict[str, object]:
    """Sign a host in by its Tailscale identity: over the tailnet, the Tailscale user that
    tailscaled names for the caller gets a 30-day API key if a Legator user of that login
    name or e-mail exists. Anywhere else: 401 (404 when Tailscale sign-in is not enabled)."""
    logins = request.app.state.deploy_tailscale
    # The address tailscaled is asked about grants a key: by default the connection's own,
    # since a forwarded one can be sent by anyone who connects from a trusted proxy's address.
    via_proxy = core_of(request).settings.tailscale_login_via_proxy
    caller = client_ip(request) if via_proxy else peer_ip(request)
    return await logins.login(caller, body.client_name)  # type: ignore[no-any-return]


@router.post("/device/code", dependencies=[require(Permission.PUBLIC)])
async def device_code(body: DeviceStart, request: Request) -> dict[str, object]:
    """Start a device login: returns a ``device_code`` (keep it secret) and a ``user_code``
    that a signed-in user approves with ``POST /api/v1/deploy/device/approve``."""
    return await _devices(request).start(body.client_name, client_ip(request))


@router.post("/device/approve")
async def device_approve(
    body: DeviceApprove, request: Request, principal: Principal = require(Permission.DEPLOY_WRITE)
) -> dict[str, object]:
    """Approve a pending device login for yourself; the device then receives an API key of
    yours that expires in 30 days."""
    return await _devices(request).approve(principal, body.user_code)


@router.post("/device/token", dependencies=[require(Permission.PUBLIC)])
async def device_token(body: DevicePoll, request: Request) -> dict[str, object]:
    """Poll: ``{"status": "pending"}`` until approved, then the API key once."""
    return await _devices(request).poll(body.device_code)
