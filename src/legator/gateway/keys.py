"""Inference keys: the core's API keys with the ``inference`` scope and an optional pin."""

from __future__ import annotations

from datetime import timedelta

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal, ensure_may_manage_own_keys
from legator.core.auth.schemas import KeyOut
from legator.core.auth.service import AuthService
from legator.core.db import utcnow
from legator.core.errors import BadRequest, Forbidden, NotFound
from legator.gateway.catalog import Catalog
from legator.gateway.schemas import InferenceKeyCreate, InferenceKeyCreated, InferenceKeyOut

SCOPE = "inference"


def _may_mint_own(principal: Principal) -> None:
    """A key of yours may mint an inference key only if it could manage your keys at all
    (``account``) and holds ``gateway:infer`` itself: a key scoped to ``gateway:read``, say,
    must not give itself the right to infer."""
    ensure_may_manage_own_keys(principal)
    if not principal.can(Permission.GATEWAY_INFER):
        raise Forbidden("a new key cannot hold permissions that the calling key lacks")


def _out(key: KeyOut) -> InferenceKeyOut:
    pin = (key.attributes or {}).get("gateway") or {}
    return InferenceKeyOut(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        username=key.username,
        model=pin.get("model"),
        category=pin.get("category"),
        service=bool(pin.get("service")),
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
    )


class InferenceKeys:
    def __init__(self, auth: AuthService, catalog: Catalog) -> None:
        self.auth = auth
        self.catalog = catalog

    async def create(self, data: InferenceKeyCreate, principal: Principal) -> InferenceKeyCreated:
        admin = principal.can(Permission.GATEWAY_ADMIN)
        if (data.user or data.service) and not admin:
            raise Forbidden("only admins create keys for others or service keys")
        if not (data.user or data.service):
            _may_mint_own(principal)
        owner = data.user or principal.user_id
        if owner is None:
            raise BadRequest("user: required when authentication is disabled")
        # A model the caller may not see (a disabled one) is as absent as an unknown one: a
        # different answer would tell which hidden models exist.
        usable = (
            self.catalog.models
            if admin
            else {m.id for m in self.catalog.visible(principal) if m.id == data.model}
        )
        if data.model and data.model not in usable:
            raise BadRequest(f"model: {data.model!r} does not exist")
        if data.category and data.category not in self.catalog.categories:
            raise BadRequest(f"category: {data.category!r} does not exist")
        pin = {
            k: v
            for k, v in {
                "model": data.model,
                "category": data.category,
                "service": data.service or None,
            }.items()
            if v
        }
        key, raw = await self.auth.create_key(
            owner,
            name=data.name,
            scopes=[SCOPE],
            expires_at=utcnow() + timedelta(days=data.expires_in_days),
            attributes={"gateway": pin},
            actor=principal.actor,
        )
        return InferenceKeyCreated(**_out(key).model_dump(), key=raw)

    async def list(self, principal: Principal, *, everyone: bool) -> list[InferenceKeyOut]:
        if everyone and not principal.can(Permission.GATEWAY_ADMIN):
            raise Forbidden("only admins list everyone's keys")
        if principal.user_id is None and not everyone:
            return []
        keys = await self.auth.list_keys(None if everyone else principal.user_id)
        return [_out(k) for k in keys if SCOPE in k.scopes]

    async def revoke(self, key_id: str, principal: Principal) -> InferenceKeyOut:
        key = await self.auth.get_key(key_id)
        own = principal.user_id is not None and key.user_id == principal.user_id
        admin = principal.can(Permission.GATEWAY_ADMIN)
        if SCOPE not in key.scopes or not (own or admin):
            raise NotFound(f"inference key {key_id!r} does not exist")
        if not admin:
            ensure_may_manage_own_keys(principal)
        return _out(await self.auth.revoke_key(key.id, actor=principal.actor))

    async def pinned_to(self, model_id: str) -> list[KeyOut]:
        """Live (unrevoked) keys pinned to ``model_id``."""
        keys = await self.auth.list_keys(None)
        return [
            k
            for k in keys
            if k.revoked_at is None
            and ((k.attributes or {}).get("gateway") or {}).get("model") == model_id
        ]
