"""A deployment configuration: the services picked and their options, validated."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from legator.deploy.catalog.options import ServiceOptions
from legator.deploy.catalog.registry import CATALOG


class DeploySpec(BaseModel):
    """What a user saves: ``{"network": "legator", "services": {"redis": {...options}}}``.
    A key ``TEMPLATE@INSTANCE`` adds another instance of a service (``llamacpp@coder`` becomes
    the unit ``llamacpp-coder``), e.g. one llama.cpp backend per model."""

    model_config = ConfigDict(extra="forbid")

    network: str = Field("legator", pattern=r"^[a-z][a-z0-9-]{0,40}$")
    services: dict[str, dict[str, Any]] = Field(min_length=1)


class SpecError(ValueError):
    """``errors``: ``[{"field": "services.redis.port", "message": "..."}]``."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


_INSTANCE = re.compile(r"^[a-z0-9]{1,20}$")


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


def validate_spec(raw: dict[str, Any] | DeploySpec) -> ValidSpec:
    try:
        spec = raw if isinstance(raw, DeploySpec) else DeploySpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(
            [{"field": _field("spec", e["loc"]), "message": e["msg"]} for e in exc.errors()]
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
