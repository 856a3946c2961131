"""Per-file checks: sections, keys and value syntax for each quadlet type."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

from legator.deploy.quadlet.keys import KEYS, REQUIRED, SYSTEMD_SECTIONS
from legator.deploy.quadlet.parse import QUADLET_TYPES, Unit

Level = Literal["error", "warning"]
_PORT = re.compile(
    r"^(?:(?:(?P<ip>\[[0-9a-fA-F:]+\]|[0-9.]+):)?(?P<host>\d+(?:-\d+)?)?:)?"
    r"(?P<container>\d+(?:-\d+)?)(?:/(?P<proto>tcp|udp|sctp))?$"
)
_SECRET_OPTS = {"type", "target", "uid", "gid", "mode"}
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z")


@dataclass(frozen=True)
class Finding:
    level: Level
    unit: str
    check: str
    message: str
    line: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.unit}:{self.line}" if self.line else self.unit
        return f"{self.level}: {where}: {self.message} [{self.check}]"


@dataclass(frozen=True)
class PortSpec:
    ip: str
    host: int
    proto: str


def parse_publish(value: str) -> list[PortSpec] | None:
    """Host ports bound by a ``PublishPort=`` value; ``None`` if the value is malformed."""
    match = _PORT.match(value.strip())
    if not match:
        return None
    host = match.group("host")
    if host is None:
        return []  # container port only: podman picks a random host port
    ip = (match.group("ip") or "").strip("[]")  # "" = every address
    proto = match.group("proto") or "tcp"
    first, _, last = host.partition("-")
    low, high = int(first), int(last or first)
    if not 0 < low <= high <= 65535:
        return None
    return [PortSpec(ip, port, proto) for port in range(low, high + 1)]


def secret_name(value: str) -> str:
    """The Podman secret a ``Secret=NAME[,OPTION=…]`` value names."""
    return value.split(",", 1)[0].strip()


def validate_unit(unit: Unit) -> list[Finding]:
    if unit.suffix not in QUADLET_TYPES:
        return [Finding("error", unit.name, "type", f"unknown quadlet type {unit.suffix!r}")]
    findings: list[Finding] = []
    own = unit.type_section
    if own not in unit.sections:
        findings.append(Finding("error", unit.name, "section", f"missing the [{own}] section"))
    for section, entries in unit.sections.items():
        if section in SYSTEMD_SECTIONS or section.startswith("X-"):
            continue
        if section != own:
            findings.append(
                Finding("error", unit.name, "section", f"[{section}] does not belong in {own}")
            )
            continue
        allowed = KEYS[own]
        for key, value, line in entries:
            if key not in allowed:
                findings.append(
                    Finding("error", unit.name, "key", f"unknown key {key}= in [{own}]", line)
                )
            else:
                findings.extend(_check_value(unit, key, value, line))
    for choices in REQUIRED.get(own, []):
        if own in unit.sections and not any(unit.get(own, key) for key in choices):
            need = " or ".join(f"{key}=" for key in choices)
            findings.append(Finding("error", unit.name, "required", f"[{own}] needs {need}"))
    return findings


def _check_value(unit: Unit, key: str, value: str, line: int) -> list[Finding]:
    def bad(message: str) -> list[Finding]:
        return [Finding("error", unit.name, "value", message, line)]

    if key == "PublishPort" and parse_publish(value) is None:
        return bad(f"PublishPort={value} is not [[IP:][HOST]:]CONTAINER[/PROTO]")
    if key == "Secret":
        name, *options = value.split(",")
        if not _NAME.match(name):
            return bad(f"Secret={value}: {name!r} is not a valid secret name")
        for option in options:
            opt, sep, _ = option.partition("=")
            if not sep or opt not in _SECRET_OPTS:
                return bad(f"Secret={value}: unknown option {option!r}")
    if key in {"ContainerName", "VolumeName", "NetworkName", "PodName"} and not _NAME.match(value):
        return bad(f"{key}={value} is not a valid name")
    if key == "Volume" and unit.suffix != ".volume" and not value:
        return bad("Volume= is empty")
    return []
