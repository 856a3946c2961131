"""`leger secrets fetch SERVICE`: the secrets a service's quadlet asks for, written as a 0600
EnvironmentFile in the user's runtime directory, for units that use ``EnvironmentFile=``."""

from __future__ import annotations

import os
from pathlib import Path

from legator.core.security import write_private_file
from legator.deploy.quadlet.parse import Unit, load_dir
from legator.deploy.secrets_source import SecretSource


class EnvFileError(Exception):
    pass


def find_unit(quadlet_dir: Path, service: str) -> Unit:
    units, _errors = load_dir(quadlet_dir)
    wanted = service.removesuffix(".service")
    for unit in units:
        if unit.suffix == ".container" and wanted in (unit.stem, unit.service_name[:-8]):
            return unit
    raise EnvFileError(f"no container named {service!r} in {quadlet_dir}")


def secret_variables(unit: Unit) -> list[tuple[str, str]]:
    """(secret name, environment variable) for each ``Secret=`` of the container; a secret
    mounted as a file (``type=mount``) has no variable and is skipped."""
    pairs = []
    for value in unit.values("Container", "Secret"):
        name, *options = value.split(",")
        settings = dict(option.split("=", 1) for option in options if "=" in option)
        if settings.get("type", "mount") != "env":
            continue
        pairs.append((name, settings.get("target") or name.upper().replace("-", "_")))
    return pairs


def _quote(name: str, value: bytes) -> str:
    text = value.decode("utf-8", errors="strict")
    if "\n" in text or "\x00" in text:
        raise EnvFileError(f"the value of {name} holds a newline or NUL, which an env file cannot")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def runtime_dir() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}")


def fetch_env(quadlet_dir: Path, service: str, source: SecretSource) -> tuple[Path, list[str]]:
    """Write ``<runtime dir>/<service>.env``; returns its path and the variables it sets.
    Every secret is read before anything is written, so a missing one changes nothing."""
    unit = find_unit(quadlet_dir, service)
    pairs = secret_variables(unit)
    if not pairs:
        raise EnvFileError(f"{unit.name} asks for no secret as an environment variable")
    lines = [f"{var}={_quote(var, source.get(name))}" for name, var in pairs]
    directory = runtime_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{unit.stem}.env"
    write_private_file(path, "\n".join(lines) + "\n")
    return path, [var for _, var in pairs]
