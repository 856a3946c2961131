"""A deployment configuration: the services picked and their options, validated."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from legator.deploy.catalog.options import ServiceOptions
from legator.deploy.catalog.registry import CATALOG

MAX_SERVICES = 256
"""Services (instances included) in one configuration. The catalogue has a handful of
templates; even one llama.cpp instance per model on a big host stays far below this. Every
service costs two rendered files, so this also bounds rendering and diffing."""
MAX_OPTIONS = 32
"""Options given for one service (the largest template has 8; unknown ones are errors)."""
MAX_SERVICE_KEY = 64
"""Characters in a service key (``TEMPLATE@INSTANCE`` is at most ~30)."""
MAX_SPEC_BYTES = 256 * 1024
"""The spec as compact JSON. 256 services with every option set take ~55 KB; this bounds
long option values too, and so what a listing of stored versions reads and sends."""

Options = Annotated[dict[str, Any], Field(max_length=MAX_OPTIONS)]


class DeploySpec(BaseModel):
    """What a user saves: ``{"network": "legator", "services": {"redis": {...options}}}``.
    A key ``TEMPLATE@INSTANCE`` adds another instance of a service (``llamacpp@coder`` becomes
    the unit ``llamacpp-coder``), e.g. one llama.cpp backend per model.

    At most :data:`MAX_SERVICES` services, :data:`MAX_OPTIONS` options each,
    :data:`MAX_SPEC_BYTES` in all."""

    model_config = ConfigDict(extra="forbid")

    network: str = Field("legator", pattern=r"^[a-z][a-z0-9-]{0,40}$")
    services: dict[str, Options] = Field(min_length=1)

    @field_validator("services", mode="before")
    @classmethod
    def _at_most(cls, value: Any, info: ValidationInfo) -> Any:
        # Checked before the entries are looked at, so an oversized spec costs nothing more.
        # Versions stored before the limit existed are still read back (context "stored").
        if not isinstance(value, dict):
            return value
        stored = isinstance(info.context, dict) and info.context.get("stored")
        if len(value) > MAX_SERVICES and not stored:
            raise ValueError(f"at most {MAX_SERVICES} services per configuration, got {len(value)}")
        for key in value:
            if isinstance(key, str) and len(key) > MAX_SERVICE_KEY:
                # Named shortened: the key is echoed back in the error.
                raise ValueError(
                    f"service key {key[:20]!r}... is longer than {MAX_SERVICE_KEY} characters"
                )
        return value

    @model_validator(mode="after")
    def _small_enough(self, info: ValidationInfo) -> DeploySpec:
        if not (isinstance(info.context, dict) and info.context.get("stored")):
            size = len(self.__pydantic_serializer__.to_json(self))
            if size > MAX_SPEC_BYTES:
                raise ValueError(
                    f"at most {MAX_SPEC_BYTES // 1024} KiB of JSON per configuration, "
                    f"got {size // 1024} KiB"
                )
        return self


class SpecError(ValueError):
    """``errors``: ``[{"field": "services.redis.port", "message": "..."}]``."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


_INSTANCE = re.compile(r"^[a-z0-9]{1,20}\Z")


@dataclass(frozen=True)
class ValidSpec:
    network: str
    services: dict[str, ServiceOptions]  # by spec key


def template_of(key: str) -> str:
    return key.split("@", 1)[0]


def unit_name(key: str) -> str:
    """``redis`` -> ``redis``; ``llamacpp@coder`` -> ``llamacpp-coder``."""
    return key.replace("@", "-", 1)


def _field(prefix: str, loc: tuple[int | str, ...]) -> str:
    return ".".join([prefix, *(str(part) for part in loc)]) if loc else prefix


def validate_spec(raw: dict[str, Any] | DeploySpec, *, stored: bool = False) -> ValidSpec:
    """Check a spec against the catalogue. ``stored``: a version read back from the database,
    which was valid when saved; the service-count limit is not applied to it again (versions
    saved before the limit existed must stay readable). CPU-bound: linear in the services."""
    try:
        spec = (
            raw
            if isinstance(raw, DeploySpec)
            else DeploySpec.model_validate(raw, context={"stored": stored})
        )
    except ValidationError as exc:
        raise SpecError(
            [
                {
                    "field": _field("spec", e["loc"]),
                    "message": e["msg"].removeprefix("Value error, "),
                }
                for e in exc.errors()
            ]
        ) from None
    errors: list[dict[str, str]] = []
    services: dict[str, ServiceOptions] = {}
    for name, values in spec.services.items():
        base, _, instance = name.partition("@")
        template = CATALOG.get(base)
        if "@" in name and not _INSTANCE.match(instance):
            errors.append(
                {"field": f"services.{name}", "message": "instance must be 1-20 of a-z 0-9"}
            )
            continue
        if template is None:
            known = ", ".join(sorted(CATALOG))
            errors.append(
                {"field": f"services.{name}", "message": f"unknown service; pick from {known}"}
            )
            continue
        try:
            services[name] = template.options.model_validate(values)
        except ValidationError as exc:
            errors += [
                {"field": _field(f"services.{name}", e["loc"]), "message": e["msg"]}
                for e in exc.errors()
            ]
    for name, opts in services.items():
        for dep in CATALOG[template_of(name)].requires(opts):
            if dep not in spec.services:
                errors.append(
                    {
                        "field": f"services.{name}",
                        "message": f"requires {dep}, which is not selected",
                    }
                )
    seen: dict[int, str] = {}
    for name, opts in services.items():
        if opts.port is not None:
            if opts.port in seen:
                errors.append(
                    {
                        "field": f"services.{name}.port",
                        "message": f"port {opts.port} is already used by {seen[opts.port]}",
                    }
                )
            seen.setdefault(opts.port, name)
    if errors:
        raise SpecError(errors)
    return ValidSpec(network=spec.network, services=services)
