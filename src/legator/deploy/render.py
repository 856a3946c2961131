"""Turn a validated configuration into quadlet files and their manifest."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from graphlib import TopologicalSorter

import jinja2

from legator.deploy.catalog.registry import CATALOG
from legator.deploy.manifest import Manifest, build_manifest
from legator.deploy.spec import ValidSpec, template_of, unit_name


@dataclass(frozen=True)
class Rendered:
    files: dict[str, bytes]
    manifest: Manifest


def _literal(value: object) -> object:
    """Every ``{{ value }}`` in a template: systemd resolves ``%x`` specifiers and expands
    ``$VAR``/``${VAR}`` in the ``ExecStart=`` the generator writes (it holds ``Exec=``,
    ``Environment=`` and ``PublishPort=`` verbatim), where ``a%20b`` fails the unit, ``%h``
    becomes a path and ``${HOME}`` the manager's value or nothing; ``%%`` and ``$$`` are
    one literal ``%`` and ``$``."""
    if not isinstance(value, str):
        return value
    return value.replace("%", "%%").replace("$", "$$")


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        finalize=_literal,
        loader=jinja2.PackageLoader("legator.deploy.catalog", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - renders unit files, not HTML
    )


def service_order(spec: ValidSpec) -> list[str]:
    """Dependencies first (the order services start in), by name within a level."""
    sorter = TopologicalSorter(
        {
            unit_name(key): set(CATALOG[template_of(key)].requires(opts))
            for key, opts in spec.services.items()
        }
    )
    sorter.prepare()
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())  # sorted: the same spec always gives the same order
        order += ready
        sorter.done(*ready)
    return order


def render(spec: ValidSpec, *, version: int, created_at: datetime) -> Rendered:
    env = _environment()
    files: dict[str, bytes] = {}
    secrets: list[str] = []
    common = {"version": version, "network": spec.network}
    files[f"{spec.network}.network"] = env.get_template("network.j2").render(**common).encode()
    for key, opts in spec.services.items():
        template = CATALOG[template_of(key)]
        name = unit_name(key)
        needs = template.secrets(opts)
        secrets += [need.name for need in needs]
        context = {
            **common,
            "name": name,
            "title": template.title,
            "o": opts,
            "dep_units": [f"{dep}.service" for dep in template.requires(opts)],
            "secrets": needs,
            "container_port": template.container_port,
            "data_path": template.data_path,
        }
        body = env.get_template(f"{template.name}.container.j2").render(**context)
        files[f"{name}.container"] = body.encode()
        files[f"{name}-data.volume"] = env.get_template("volume.j2").render(**context).encode()
    manifest = build_manifest(
        files,
        version=version,
        created_at=created_at,
        secrets=secrets,
        services=service_order(spec),
    )
    return Rendered(files=files, manifest=manifest)
