"""The control plane's secrets: the same store and service as legerd, mounted under
``/api/v1/secrets/<call>`` with setec's calls and bodies, control-plane authentication
(SECRETS_READ for list/get/info, SECRETS_WRITE for the rest) and the core audit log.

Names under ``legator/`` are the control plane's own (the Model Dock's provider keys,
``legator/brain/<profile id>``): its code reaches them with its own callers, and no caller
of this API, admin included, may list, read, write or delete them here."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.from_thread
import anyio.to_thread
import psycopg
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from legator.core.auth.permissions import Permission as P
from legator.core.auth.principal import Principal
from legator.core.config import ConfigError
from legator.core.errors import AppError, BadRequest, Forbidden, NotFound
from legator.core.http.deps import require
from legator.core.runtime import Core
from legator.secrets.acl import ALL_ACTIONS, Action, Rule
from legator.secrets.errors import (
    AccessDenied,
    InvalidRequest,
    SecretNotFound,
    SecretsError,
    ValueNotChanged,
    VersionClaimed,
)
from legator.secrets.identity import Caller
from legator.secrets.location import open_store, warn_of_sqlite_store_left_behind
from legator.secrets.schemas import (
    CreateVersionIn,
    GetIn,
    ListIn,
    NameIn,
    PutIn,
    SecretInfoOut,
    SecretValueOut,
    VersionIn,
)
from legator.secrets.service import SecretsService
from legator.secrets.wire import field_bytes, info_json, value_json

T = TypeVar("T")
router = APIRouter(prefix="/api/v1/secrets", tags=["secrets"])

RESERVED_PREFIX = "legator/"
# Every name but the control plane's own: a reserved secret is neither listed nor readable,
# and nobody can overwrite, delete or plant one (say legator/brain/<a future profile id>).
_NOT_RESERVED = re.compile(r"\A(?!" + re.escape(RESERVED_PREFIX) + r").*\Z", re.DOTALL)
_READ = Rule(frozenset({Action.GET, Action.INFO}), (_NOT_RESERVED,))
_WRITE = Rule(ALL_ACTIONS, (_NOT_RESERVED,))


class VersionAlreadySet(AppError):
    status_code = 412
    code = "version_claimed"


class CoreAudit:
    """The service's audit sink, writing to the control plane's audit log. The service runs
    in a worker thread (its writes fsync), so each record hops back to the event loop."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def record(
        self,
        *,
        principal: str,
        action: str,
        secret: str,
        version: int,
        authorized: bool,
        durable: bool = False,
        **extra: Any,
    ) -> None:
        # The service's outcome (ok, unchanged, denied, not-found, …) stays in the details.
        outcome = extra.get("outcome", "ok")
        if not authorized:
            core_outcome = "denied"
        elif outcome in ("ok", "unchanged"):
            core_outcome = "success"
        else:
            core_outcome = "error" if outcome == "error" else "failure"
        anyio.from_thread.run(
            lambda: self.core.audit.log(
                actor=principal,
                action=f"secrets.{action}",
                target=secret,
                outcome=core_outcome,
                details={"version": version, **extra},
            )
        )


def caller_for(principal: Principal) -> Caller:
    rules = []
    if principal.can(P.SECRETS_WRITE):
        rules.append(_WRITE)
    if principal.can(P.SECRETS_READ):
        rules.append(_READ)
    return Caller(principal.actor, (principal.actor,), tuple(rules), "control-plane")


def service_of(request: Request) -> SecretsService:
    return request.app.state.secrets  # type: ignore[no-any-return]


async def run(fn: Callable[..., T], *args: Any) -> T:
    """Call the service in a worker thread and turn its errors into the control plane's."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except AccessDenied:
        # The service's calls are (caller, name, ...); list is (caller,) and is never denied.
        name = args[1] if len(args) > 1 else None
        if isinstance(name, str) and name.startswith(RESERVED_PREFIX):
            raise Forbidden(
                f"secrets under {RESERVED_PREFIX} belong to the control plane "
                "and cannot be reached through this API"
            ) from None
        raise Forbidden("your role may not do this to that secret") from None
    except SecretNotFound:
        raise NotFound("no such secret or version") from None
    except VersionClaimed:
        raise VersionAlreadySet("that version of the secret was already used") from None
    except InvalidRequest as exc:
        raise BadRequest(exc.message) from None


def _value(raw: str) -> bytes:
    try:
        return field_bytes({"Value": raw}, "Value")
    except SecretsError as exc:
        raise BadRequest(exc.message) from None


@router.post("/list", response_model=list[SecretInfoOut])
async def list_secrets(
    body: ListIn, request: Request, principal: Principal = require(P.SECRETS_READ)
) -> list[dict[str, Any]]:
    """Secrets you may see: names, versions and the active version (never values)."""
    infos = await run(service_of(request).list, caller_for(principal))
    return [info_json(i) for i in infos]


@router.post("/get", response_model=SecretValueOut, responses={304: {"description": "unchanged"}})
async def get_secret(
    body: GetIn, request: Request, principal: Principal = require(P.SECRETS_READ)
) -> Any:
    """A value (base64) and its version; Version 0 is the active one. With UpdateIfChanged,
    304 while the active version is still Version."""
    svc = service_of(request)
    try:
        result = await run(
            svc.get, caller_for(principal), body.Name, body.Version, body.UpdateIfChanged
        )
    except ValueNotChanged:
        return Response(status_code=304)
    return value_json(result.value, result.version)


@router.post("/info", response_model=SecretInfoOut)
async def info_secret(
    body: NameIn, request: Request, principal: Principal = require(P.SECRETS_READ)
) -> dict[str, Any]:
    """A secret's versions and active version."""
    return info_json(await run(service_of(request).info, caller_for(principal), body.Name))


@router.post("/put", response_model=int)
async def put_secret(
    body: PutIn, request: Request, principal: Principal = require(P.SECRETS_WRITE)
) -> int:
    """Store a value; answers the version (the first is active, later ones are not)."""
    svc = service_of(request)
    return await run(svc.put, caller_for(principal), body.Name, _value(body.Value))


@router.post("/activate")
async def activate_secret(
    body: VersionIn, request: Request, principal: Principal = require(P.SECRETS_WRITE)
) -> dict[str, Any]:
    """Make a version the active one."""
    await run(service_of(request).activate, caller_for(principal), body.Name, body.Version)
    return {}


@router.post("/delete")
async def delete_secret(
    body: NameIn, request: Request, principal: Principal = require(P.SECRETS_WRITE)
) -> dict[str, Any]:
    """Delete a secret and all its versions."""
    await run(service_of(request).delete, caller_for(principal), body.Name)
    return {}


@router.post("/delete-version")
async def delete_secret_version(
    body: VersionIn, request: Request, principal: Principal = require(P.SECRETS_WRITE)
) -> dict[str, Any]:
    """Delete one inactive version; its number is never reused."""
    await run(service_of(request).delete_version, caller_for(principal), body.Name, body.Version)
    return {}


@router.post("/create-version")
async def create_secret_version(
    body: CreateVersionIn, request: Request, principal: Principal = require(P.SECRETS_WRITE)
) -> dict[str, Any]:
    """Create exactly this version and make it active; 412 if it was ever used."""
    svc = service_of(request)
    await run(
        svc.create_version, caller_for(principal), body.Name, body.Version, _value(body.Value)
    )
    return {}


def install_secrets(app: FastAPI, core: Core) -> None:
    try:
        store, scratch = open_store(core.settings)
    except SecretsError as exc:
        raise ConfigError(f"secrets store: {exc.message}") from None
    except psycopg.Error as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"secrets store: cannot open it in PostgreSQL: {detail}") from None
    warn_of_sqlite_store_left_behind(core.settings)
    app.state.secrets = SecretsService(store, CoreAudit(core))
    app.include_router(router)

    async def close() -> None:
        store.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    core.shutdown_hooks.append(close)
