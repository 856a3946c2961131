"""The model catalogue and categories (cached in memory) and the model resolver."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from legator.core.audit.service import AuditService
from legator.core.auth.principal import Principal
from legator.core.db import Database
from legator.core.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from legator.core.security import mask_url
from legator.gateway.gguf import GGUFError, GGUFInfo, read_metadata
from legator.gateway.models import GatewayCategory, GatewayModel
from legator.gateway.schemas import (
    CategoryIn,
    CategoryOut,
    CategoryUpdate,
    ModelCreate,
    ModelOut,
    ModelUpdate,
)


def _model_file_info(path: str) -> GGUFInfo:
    file = Path(path)
    if not file.is_file():
        raise BadRequest(f"model_path: {path} is not a file")
    try:
        return read_metadata(file)
    except GGUFError as exc:
        raise BadRequest(f"model_path: {exc}") from None


@dataclass(frozen=True)
class Resolved:
    model: ModelOut
    category: str | None


def key_pin(principal: Principal) -> tuple[str | None, str | None]:
    """(model, category) a key is pinned to, from ``ApiKey.attributes['gateway']``."""
    pin: dict[str, Any] = principal.key_attributes.get("gateway") or {}
    return pin.get("model"), pin.get("category")


class Catalog:
    def __init__(self, db: Database, audit: AuditService) -> None:
        self.db = db
        self.audit = audit
        self.models: dict[str, ModelOut] = {}
        self.categories: dict[str, CategoryOut] = {}
        self.listeners: list[Any] = []  # callables(ModelOut | None, model_id) on change
        self.written: list[Callable[[], None]] = []  # called after each write of this replica
        self._writes = 0  # this replica's writes so far: a reload that overlaps one reads again

    async def load(self) -> None:
        self.models, self.categories = await self._read()

    async def _read(self) -> tuple[dict[str, ModelOut], dict[str, CategoryOut]]:
        async with self.db.session() as session:
            models = (await session.scalars(select(GatewayModel))).all()
            cats = (await session.scalars(select(GatewayCategory))).all()
        return (
            {m.id: ModelOut.model_validate(m) for m in models},
            {c.name: CategoryOut.model_validate(c) for c in cats},
        )

    async def reload(self) -> None:
        """Read everything again (another replica wrote) and tell the listeners about each
        model that changed."""
        while True:
            writes = self._writes
            models, categories = await self._read()
            if writes == self._writes:  # else a write of ours may be missing from what we read
                break
        before, self.models, self.categories = self.models, models, categories
        for model_id in before.keys() | models.keys():
            if before.get(model_id) != models.get(model_id):
                self._changed(model_id)

    def _wrote(self) -> None:
        self._writes += 1
        for hook in self.written:
            hook()

    def _changed(self, model_id: str) -> None:
        for listener in self.listeners:
            listener(self.models.get(model_id), model_id)

    # ----- models --------------------------------------------------------------------------

    def get_model(self, model_id: str) -> ModelOut:
        model = self.models.get(model_id)
        if model is None:
            raise NotFound(f"model {model_id!r} does not exist")
        return model

    async def create_model(self, data: ModelCreate, *, actor: str) -> ModelOut:
        self._check_categories(data.categories)
        fields = data.model_dump()
        fields["backend_url"] = fields["backend_url"] or ""
        if data.backend_kind != "external":
            # A managed model starts unavailable: it is ready once its backend is healthy.
            fields["gguf"] = (
                await asyncio.to_thread(_model_file_info, data.model_path)
            ).model_dump()
            fields["state"] = "unavailable"
        async with self.db.write() as session:
            if await session.get(GatewayModel, data.id):
                raise Conflict(f"model {data.id!r} already exists")
            row = GatewayModel(**fields)
            session.add(row)
            await session.flush()
            await self.audit.record(
                session,
                actor=actor,
                action="gateway.model.create",
                target=f"model:{row.id}",
                details={"backend_kind": row.backend_kind, "parallel": row.parallel},
            )
            out = ModelOut.model_validate(row)
        self.models[out.id] = out
        self._wrote()
        self._changed(out.id)
        return out

    async def update_model(self, model_id: str, data: ModelUpdate, *, actor: str) -> ModelOut:
        changes = data.model_dump(exclude_unset=True, exclude_none=True)
        if "categories" in changes:
            self._check_categories(changes["categories"])
        async with self.db.write() as session:
            row = await session.get(GatewayModel, model_id)
            if row is None:
                raise NotFound(f"model {model_id!r} does not exist")
            if changes.get("backend_url") == mask_url(row.backend_url):
                # The URL as admins are shown it (credentials masked), sent back unchanged.
                del changes["backend_url"]
            for name, value in changes.items():
                setattr(row, name, value)
            await session.flush()
            details = dict(changes)
            if "backend_url" in details:
                details["backend_url"] = mask_url(details["backend_url"])
            await self.audit.record(
                session,
                actor=actor,
                action="gateway.model.update",
                target=f"model:{model_id}",
                details=details,
            )
            out = ModelOut.model_validate(row)
        self.models[out.id] = out
        self._wrote()
        self._changed(out.id)
        return out

    async def delete_model(self, model_id: str, *, actor: str) -> None:
        async with self.db.write() as session:
            row = await session.get(GatewayModel, model_id)
            if row is None:
                raise NotFound(f"model {model_id!r} does not exist")
            await session.delete(row)
            for cat in (await session.scalars(select(GatewayCategory))).all():
                if cat.preferred_model == model_id:
                    cat.preferred_model = None
            await self.audit.record(
                session, actor=actor, action="gateway.model.delete", target=f"model:{model_id}"
            )
        self.models.pop(model_id, None)
        await self.load()
        self._wrote()
        self._changed(model_id)

    def _check_categories(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.categories]
        if unknown:
            raise BadRequest(f"unknown categor{'y' if len(unknown) == 1 else 'ies'}: {unknown}")

    # ----- categories ------------------------------------------------------------------------

    async def create_category(self, data: CategoryIn, *, actor: str) -> CategoryOut:
        if data.preferred_model and data.preferred_model not in self.models:
            raise BadRequest(f"preferred_model: model {data.preferred_model!r} does not exist")
        async with self.db.write() as session:
            if await session.get(GatewayCategory, data.name):
                raise Conflict(f"category {data.name!r} already exists")
            row = GatewayCategory(
                **{**data.model_dump(), "preferred_model": data.preferred_model or None}
            )
            session.add(row)
            await session.flush()
            await self.audit.record(
                session,
                actor=actor,
                action="gateway.category.create",
                target=f"category:{row.name}",
                details={"preferred_model": row.preferred_model},
            )
            out = CategoryOut.model_validate(row)
        self.categories[out.name] = out
        self._wrote()
        return out

    async def update_category(self, name: str, data: CategoryUpdate, *, actor: str) -> CategoryOut:
        changes = data.model_dump(exclude_unset=True)
        if changes.get("description", "") is None:
            del changes["description"]  # null leaves it as it is, as PATCH of a model does
        if "preferred_model" in changes:
            # null or "" clears it; a model that does not exist is a bad value, not a 404
            preferred = changes["preferred_model"] = changes["preferred_model"] or None
            if preferred is not None and preferred not in self.models:
                raise BadRequest(f"preferred_model: model {preferred!r} does not exist")
        async with self.db.write() as session:
            row = await session.get(GatewayCategory, name)
            if row is None:
                raise NotFound(f"category {name!r} does not exist")
            for key, value in changes.items():
                setattr(row, key, value)
            await session.flush()
            await self.audit.record(
                session,
                actor=actor,
                action="gateway.category.update",
                target=f"category:{name}",
                details=changes,
            )
            out = CategoryOut.model_validate(row)
        self.categories[name] = out
        self._wrote()
        return out

    async def delete_category(self, name: str, *, actor: str) -> None:
        users = [m.id for m in self.models.values() if name in m.categories]
        if users:
            raise Conflict(f"category {name!r} still has models: {sorted(users)}")
        async with self.db.write() as session:
            row = await session.get(GatewayCategory, name)
            if row is None:
                raise NotFound(f"category {name!r} does not exist")
            await session.delete(row)
            await self.audit.record(
                session, actor=actor, action="gateway.category.delete", target=f"category:{name}"
            )
        self.categories.pop(name, None)
        self._wrote()

    # ----- resolution --------------------------------------------------------------------------

    def _from_category(self, name: str) -> ModelOut:
        category = self.categories[name]
        preferred = self.models.get(category.preferred_model or "")
        # Only while it is one of the category's models: a key pinned to the category may
        # use those alone (and lists only those).
        if preferred is not None and preferred.state == "ready" and name in preferred.categories:
            return preferred
        members = sorted(
            (m for m in self.models.values() if name in m.categories and m.state == "ready"),
            key=lambda m: m.id,
        )
        if not members:
            raise ServiceUnavailable(f"no model of category {name!r} is ready")
        return members[0]

    def _ready(self, model: ModelOut) -> ModelOut:
        if model.state != "ready":
            raise ServiceUnavailable(f"model {model.id!r} is {model.state}, not ready")
        return model

    def resolve(self, principal: Principal, requested: str | None) -> Resolved:
        """Key pinned to a model → key pinned to a category → model id or name → category."""
        pinned_model, pinned_category = key_pin(principal)
        if pinned_model:
            model = self.models.get(pinned_model)
            if model is None:
                raise NotFound(f"the model this key is pinned to ({pinned_model!r}) is gone")
            return Resolved(self._ready(model), None)
        if pinned_category:
            if pinned_category not in self.categories:
                raise NotFound(f"the category this key is pinned to ({pinned_category!r}) is gone")
            return Resolved(self._from_category(pinned_category), pinned_category)
        if not requested:
            raise BadRequest("model: field required")
        model = self.models.get(requested)
        if model is None:
            model = next((m for m in self.models.values() if m.name == requested), None)
        if model is not None:
            return Resolved(self._ready(model), None)
        if requested in self.categories:
            return Resolved(self._from_category(requested), requested)
        raise NotFound(f"model {requested!r} does not exist", details={"code": "model_not_found"})

    def visible(self, principal: Principal) -> list[ModelOut]:
        """The models a key may use, for ``GET /v1/models`` and non-admins' catalogue."""
        pinned_model, pinned_category = key_pin(principal)
        models = sorted(
            (m for m in self.models.values() if m.state != "disabled"), key=lambda m: m.id
        )
        if pinned_model:
            return [m for m in models if m.id == pinned_model]
        if pinned_category:
            return [m for m in models if pinned_category in m.categories]
        return models

    def get_visible(self, principal: Principal, model_id: str) -> ModelOut:
        """A model ``principal`` may see; any other is as absent (404) as an unknown one."""
        model = next((m for m in self.visible(principal) if m.id == model_id), None)
        if model is None:
            raise NotFound(f"model {model_id!r} does not exist")
        return model
