"""Pydantic I/O of the gateway's admin and self-service API."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from legator.core.security import mask_url

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}\Z")
MODEL_STATES = ("ready", "disabled", "unavailable")


def _slug(value: str) -> str:
    if not _SLUG.match(value):
        raise ValueError("use 1-100 letters, digits, '.', '_', ':' or '-', starting alphanumeric")
    return value


def _url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("expected an http:// or https:// URL")
    return value.rstrip("/")


class ModelBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=200, description="Display name; also accepted as `model`.")
    source_repo: str = Field("", max_length=300)
    backend_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. …/v1")
    upstream_model: str = Field("", max_length=200, description="Model name the backend expects.")
    context_length: int = Field(4096, ge=1, le=10_000_000)
    parallel: int = Field(1, ge=1, le=1024, description="Concurrent slots of the backend.")
    state: Literal["ready", "disabled", "unavailable"] = "ready"
    categories: list[str] = Field(default_factory=list, max_length=32)

    @field_validator("backend_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return None if value is None else _url(value)

    @field_validator("categories")
    @classmethod
    def _check_categories(cls, value: list[str]) -> list[str]:
        return sorted({_slug(v) for v in value})


class RuntimeArgs(BaseModel):
    """Per-model llama.cpp overrides for managed backends (bounded: they become argv)."""

    model_config = ConfigDict(extra="forbid")

    n_gpu_layers: int = Field(0, ge=0, le=999, description="`-ngl`: layers offloaded to GPU.")
    threads: int | None = Field(None, ge=1, le=256)
    jinja: bool = Field(True, description="`--jinja`: use the model's chat template.")
    chat_format: str | None = Field(
        None, pattern=r"^[a-z0-9._-]{1,64}$", description="llama-cpp-python only."
    )


BACKEND_KINDS = ("external", "process", "podman")


class ModelCreate(ModelBase):
    id: str = Field(..., description="Stable id clients send as `model`.")
    backend_kind: Literal["external", "process", "podman"] = "external"
    model_path: str = Field(
        "", max_length=1000, description="Managed runtimes: absolute path of the GGUF file."
    )
    runtime_args: RuntimeArgs = Field(default_factory=RuntimeArgs)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return _slug(value)

    @model_validator(mode="after")
    def _needs_url(self) -> ModelCreate:
        if self.backend_kind == "external" and not self.backend_url:
            raise ValueError("an external backend needs backend_url")
        if self.backend_kind != "external":
            if not self.model_path.startswith("/"):
                raise ValueError(f"a {self.backend_kind} backend needs an absolute model_path")
            directory = self.model_path.rpartition("/")[0]
            if self.backend_kind == "podman" and any(c in directory for c in ":,"):
                # Podman's --volume separates its fields with them: the mount would fail.
                raise ValueError(
                    "a podman backend's model_path cannot have ':' or ',' in its directory"
                )
            if self.backend_url:
                raise ValueError("backend_url is set by the runtime of a managed backend")
        return self


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    source_repo: str | None = Field(None, max_length=300)
    backend_url: str | None = None
    upstream_model: str | None = Field(None, max_length=200)
    context_length: int | None = Field(None, ge=1, le=10_000_000)
    parallel: int | None = Field(None, ge=1, le=1024)
    state: Literal["ready", "disabled", "unavailable"] | None = None
    categories: list[str] | None = Field(None, max_length=32)
    runtime_args: RuntimeArgs | None = None

    @field_validator("backend_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return None if value is None else _url(value)

    @field_validator("categories")
    @classmethod
    def _check_categories(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else sorted({_slug(v) for v in value})


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)

    id: str
    name: str
    source_repo: str
    backend_kind: str
    backend_url: str
    upstream_model: str
    context_length: int
    parallel: int
    state: str
    categories: list[str]
    model_path: str = ""
    gguf: dict[str, Any] | None = None
    runtime_args: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime

    @property
    def managed(self) -> bool:
        return self.backend_kind != "external"

    def masked(self) -> ModelOut:
        """What admins are shown: the model with the credentials of its URL hidden."""
        url = mask_url(self.backend_url)
        return self if url == self.backend_url else self.model_copy(update={"backend_url": url})


class ModelPublicOut(BaseModel):
    """A model as those without ``gateway:admin`` see it: no backend URL, file path or
    runtime arguments. Not a base of ``ModelOut`` on purpose: validating a ``ModelOut`` as
    this always builds a new object, never passes the full one through."""

    model_config = ConfigDict(from_attributes=True, frozen=True)

    id: str
    name: str
    source_repo: str
    backend_kind: str
    upstream_model: str
    context_length: int
    parallel: int
    state: str
    categories: list[str]
    gguf: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime


class CategoryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = Field("", max_length=2000)
    preferred_model: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _slug(value)


class CategoryUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(None, max_length=2000)
    preferred_model: str | None = None


class CategoryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)

    name: str
    description: str
    preferred_model: str | None
    created_at: datetime


class SchedulerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: float = Field(100.0, ge=-1e6, le=1e6)
    wait_weight: float = Field(1.0, ge=0, le=1e6)
    usage_weight: float = Field(10.0, ge=0, le=1e6)
    usage_scale: float = Field(1000.0, gt=0, le=1e12)
    window_minutes: float = Field(60.0, gt=0, le=7 * 24 * 60)
    max_queue: int = Field(256, ge=0, le=100_000)
    queue_timeout_s: float = Field(30.0, gt=0, le=3600)


class SchedulerSettingsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: float | None = Field(None, ge=-1e6, le=1e6)
    wait_weight: float | None = Field(None, ge=0, le=1e6)
    usage_weight: float | None = Field(None, ge=0, le=1e6)
    usage_scale: float | None = Field(None, gt=0, le=1e12)
    window_minutes: float | None = Field(None, gt=0, le=7 * 24 * 60)
    max_queue: int | None = Field(None, ge=0, le=100_000)
    queue_timeout_s: float | None = Field(None, gt=0, le=3600)


class InferenceKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("inference", min_length=1, max_length=100)
    expires_in_days: int = Field(90, ge=1, le=365)
    model: str | None = Field(None, description="Pin the key to this model.")
    category: str | None = Field(None, description="Pin the key to this category.")
    user: str | None = Field(None, description="Admins only: create the key for another user.")
    service: bool = Field(False, description="Admins only: may infer during reservations.")

    @model_validator(mode="after")
    def _one_pin(self) -> InferenceKeyCreate:
        if self.model and self.category:
            raise ValueError("pin a key to a model or to a category, not both")
        return self


class InferenceKeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    username: str
    model: str | None
    category: str | None
    service: bool
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class InferenceKeyCreated(InferenceKeyOut):
    key: str = Field(..., description="Shown once; store it now.")


class UsageRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    ts: datetime
    username: str
    key_id: str | None
    model_id: str
    category: str | None
    endpoint: str
    stream: bool
    input_tokens: int
    output_tokens: int
    latency_ms: int
    queued_ms: int
    status: int


class UsageTotals(BaseModel):
    group: str
    model: str | None = Field(None, description="In by_user_and_model: the model of the pair.")
    requests: int
    input_tokens: int
    output_tokens: int
    errors: int


class UsageReport(BaseModel):
    period: str = Field(description="hour, day, week, month, or range (since/until given)")
    since: datetime
    until: datetime
    bucket: str = Field(description="the timeline's step: minute, hour or day (UTC)")
    requests: int
    input_tokens: int
    output_tokens: int
    by_model: list[UsageTotals]
    timeline: list[UsageTotals]
    by_user: list[UsageTotals] | None = None
    by_key: list[UsageTotals] | None = None
    by_user_and_model: list[UsageTotals] | None = Field(
        None, description="Admins: each user's totals per model (group is the user)."
    )


class ReservationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    starts_at: datetime
    ends_at: datetime
    reason: str = Field("", max_length=2000)
    user: str | None = Field(None, description="Admins only: reserve for another user.")


class ReservationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    user_id: str
    username: str
    starts_at: datetime
    ends_at: datetime
    reason: str
    state: str
    decided_by: str | None
    created_at: datetime

    def user_id_matches(self, principal: Any) -> bool:
        return bool(principal.user_id) and principal.user_id == self.user_id

    def event(self) -> dict[str, Any]:
        """The payload of a ``gateway.reservation.*`` event. The core event stream goes to
        anyone with ``events:read``, so it names no one: the window and state only (the end of
        an active reservation is told to everyone in a 503 anyway). Who holds a reservation
        is for its holder and admins, through ``GET /api/v1/gateway/reservations``."""
        return self.model_dump(mode="json", include={"id", "state", "starts_at", "ends_at"})


class EstimateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str
    parallel: int | None = Field(None, ge=1, le=1024, description="Default: the model's.")
    context: int | None = Field(
        None, ge=1, le=10_000_000, description="Tokens per slot; default: the model's."
    )
