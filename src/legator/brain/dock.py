"""Model Dock: LLM profiles (provider, model, base URL, key), per-feature routing and usage.

Keys go to the control plane's encrypted secrets store under ``legator/brain/<profile id>``
and are only ever shown as a masked hint. A feature with no routed profile falls back to the
``LEGATOR_LLM_*`` settings."""

from __future__ import annotations

from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from legator.brain.models import FeatureRoute, ModelProfile, ProfileUsage
from legator.brain.providers import ProviderConfig, config_from_settings
from legator.core.auth.principal import Principal
from legator.core.db.base import new_id, utcnow
from legator.core.errors import BadRequest, Conflict, NotFound
from legator.core.runtime import Core
from legator.core.security import mask_url
from legator.secrets.acl import Action, Rule
from legator.secrets.identity import Caller

FEATURES = ("probe_chat", "fleet_chat", "task")
Feature = Literal["probe_chat", "fleet_chat", "task"]
ProviderName = Literal["openai", "anthropic", "local"]
SECRET_PREFIX = "legator/brain/"  # noqa: S105 - a name prefix, not a secret
# The brain may touch only its own secrets.
_CALLER = Caller(
    "legator-brain",
    ("legator-brain",),
    (Rule.build([a.value for a in Action], [SECRET_PREFIX + "*"]),),
    "control-plane",
)


def mask(key: str) -> str:
    return f"{key[:3]}…{key[-4:]}" if len(key) >= 12 else "…"


class ProfileIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")
    provider: ProviderName
    model: str = Field(min_length=1, max_length=200)
    base_url: str | None = Field(None, max_length=500)
    api_key: str | None = Field(None, min_length=1, max_length=4096)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value


class ProfilePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, min_length=1, max_length=200)
    base_url: str | None = Field(None, max_length=500)
    api_key: str | None = Field(None, min_length=1, max_length=4096)


class ActivateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: list[Feature] = Field(default_factory=lambda: list(FEATURES), min_length=1)


class ProfileOut(BaseModel):
    id: str
    name: str
    provider: str
    model: str
    base_url: str | None
    api_key: str | None  # masked
    features: list[str]


class ModelDock:
    def __init__(self, core: Core, state: Any) -> None:
        self.core = core
        self.state = state

    @property
    def secrets(self) -> Any:
        return self.state.secrets

    async def _put_key(self, profile_id: str, key: str) -> str:
        name = SECRET_PREFIX + profile_id
        version = await anyio.to_thread.run_sync(self.secrets.put, _CALLER, name, key.encode())
        # The store keeps the old version active until told otherwise (setec semantics).
        await anyio.to_thread.run_sync(self.secrets.activate, _CALLER, name, version)
        return name

    async def _out(self, rows: list[ModelProfile]) -> list[ProfileOut]:
        async with self.core.db.session() as session:
            routes = list(await session.scalars(select(FeatureRoute)))
        return [
            ProfileOut(
                id=row.id,
                name=row.name,
                provider=row.provider,
                model=row.model,
                base_url=mask_url(row.base_url) if row.base_url else row.base_url,
                api_key=row.key_hint,
                features=sorted(r.feature for r in routes if r.profile_id == row.id),
            )
            for row in rows
        ]

    async def list(self) -> list[ProfileOut]:
        async with self.core.db.session() as session:
            rows = list(await session.scalars(select(ModelProfile).order_by(ModelProfile.name)))
        return await self._out(rows)

    async def _get(self, profile_id: str) -> ModelProfile:
        async with self.core.db.session() as session:
            row = await session.get(ModelProfile, profile_id)
        if row is None:
            raise NotFound(f"no model profile {profile_id}")
        return row

    async def create(self, body: ProfileIn, principal: Principal) -> ProfileOut:
        async with self.core.db.session() as session:
            if await session.scalar(select(ModelProfile).where(ModelProfile.name == body.name)):
                raise Conflict(f"a model profile named {body.name!r} exists")
        row = ModelProfile(
            id=new_id(),
            name=body.name,
            provider=body.provider,
            model=body.model,
            base_url=body.base_url,
        )
        if body.api_key:
            # Stored before the row: a crash in between leaves an orphan secret, never a
            # profile that names a key that does not exist.
            row.secret_name = await self._put_key(row.id, body.api_key)
            row.key_hint = mask(body.api_key)
        async with self.core.db.write() as session:
            session.add(row)
            await self.core.audit.record(
                session,
                actor=principal.actor,
                action="brain.profile.create",
                target=row.id,
                details={"name": row.name, "provider": row.provider, "model": row.model},
            )
        return (await self._out([row]))[0]

    async def update(self, profile_id: str, body: ProfilePatch, principal: Principal) -> ProfileOut:
        row = await self._get(profile_id)
        secret_name, hint = row.secret_name, row.key_hint
        if body.api_key:
            secret_name = await self._put_key(row.id, body.api_key)
            hint = mask(body.api_key)
        async with self.core.db.write() as session:
            stored = await session.get(ModelProfile, profile_id)
            if stored is None:
                raise NotFound(f"no model profile {profile_id}")
            if body.model is not None:
                stored.model = body.model
            # A URL sent back as shown (its credentials masked) keeps the real one.
            if body.base_url is not None and body.base_url != mask_url(stored.base_url or ""):
                stored.base_url = body.base_url
            stored.secret_name, stored.key_hint, stored.updated_at = secret_name, hint, utcnow()
            await self.core.audit.record(
                session,
                actor=principal.actor,
                action="brain.profile.update",
                target=profile_id,
                details={"fields": sorted(body.model_dump(exclude_none=True))},
            )
            row = stored
        return (await self._out([row]))[0]

    async def delete(self, profile_id: str, principal: Principal) -> None:
        row = await self._get(profile_id)
        async with self.core.db.write() as session:
            await session.execute(delete(FeatureRoute).where(FeatureRoute.profile_id == row.id))
            await session.execute(delete(ModelProfile).where(ModelProfile.id == row.id))
            await self.core.audit.record(
                session, actor=principal.actor, action="brain.profile.delete", target=row.id
            )
        if row.secret_name:
            await anyio.to_thread.run_sync(self.secrets.delete, _CALLER, row.secret_name)

    async def activate(
        self, profile_id: str, features: list[str], principal: Principal
    ) -> ProfileOut:
        row = await self._get(profile_id)
        async with self.core.db.write() as session:
            for feature in features:
                route = await session.get(FeatureRoute, feature)
                if route is None:
                    session.add(FeatureRoute(feature=feature, profile_id=row.id))
                else:
                    route.profile_id = row.id
            await self.core.audit.record(
                session,
                actor=principal.actor,
                action="brain.profile.activate",
                target=row.id,
                details={"features": features},
            )
        return (await self._out([row]))[0]

    async def resolve(self, feature: str) -> tuple[str, ProviderConfig | None]:
        """The profile name (``env`` for the settings fallback) and its provider config."""
        if feature not in FEATURES:
            raise BadRequest(f"unknown feature {feature!r}")
        async with self.core.db.session() as session:
            route = await session.get(FeatureRoute, feature)
            row = await session.get(ModelProfile, route.profile_id) if route else None
        if row is None:
            return "env", config_from_settings(self.core.settings)
        key = ""
        if row.secret_name:
            value = await anyio.to_thread.run_sync(self.secrets.get, _CALLER, row.secret_name)
            key = value.value.decode()
        return row.name, ProviderConfig(
            row.provider, row.model, key, row.base_url, self.core.settings.brain_max_tokens
        )

    async def account(
        self, profile: str, feature: str, tokens_in: int, tokens_out: int, requests: int
    ) -> None:
        """Add to the totals in one statement, so turns ending together on several
        connections all count (a read, add and write would lose some)."""
        added = {
            "requests": ProfileUsage.requests + requests,
            "input_tokens": ProfileUsage.input_tokens + tokens_in,
            "output_tokens": ProfileUsage.output_tokens + tokens_out,
        }
        where = (ProfileUsage.profile == profile) & (ProfileUsage.feature == feature)
        for _ in range(2):
            try:
                async with self.core.db.write() as session:
                    updated = await session.execute(update(ProfileUsage).where(where).values(added))
                    if updated.rowcount == 0:  # type: ignore[attr-defined]
                        first = ProfileUsage(
                            profile=profile,
                            feature=feature,
                            requests=requests,
                            input_tokens=tokens_in,
                            output_tokens=tokens_out,
                        )
                        session.add(first)
                return
            except IntegrityError:
                continue  # another turn made the row first: add to it

    async def usage(self) -> list[dict[str, Any]]:
        async with self.core.db.session() as session:
            rows = list(await session.scalars(select(ProfileUsage)))
        return [
            {
                "profile": r.profile,
                "feature": r.feature,
                "requests": r.requests,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
            }
            for r in sorted(rows, key=lambda r: (r.profile, r.feature))
        ]
