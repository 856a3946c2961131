"""Checks across a set of units: names, host ports, volumes, references and dependency cycles."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import psutil

from legator.deploy.quadlet.parse import QUADLET_TYPES, Unit
from legator.deploy.quadlet.validate import Finding, PortSpec, parse_publish

_DEPENDENCY_KEYS = ("Requires", "Wants", "After", "BindsTo", "Requisite", "PartOf")
_REFERENCE_KEYS = {"Network": ".network", "Volume": ".volume", "Pod": ".pod", "Image": ".image"}


def container_name(unit: Unit) -> str:
    return unit.get("Container", "ContainerName") or f"systemd-{unit.stem}"


def volume_name(unit: Unit) -> str:
    return unit.get("Volume", "VolumeName") or f"systemd-{unit.stem}"


def volumes_used(unit: Unit) -> list[str]:
    """Named volumes a container or pod mounts, as Podman names them."""
    names = []
    for value in unit.values(unit.type_section, "Volume"):
        source = value.split(":", 1)[0]
        if source.endswith(".volume"):
            names.append(f"systemd-{source[: -len('.volume')]}")
        elif source and not source.startswith(("/", ".", "%")):
            names.append(source)
    return names


def published_ports(unit: Unit) -> list[PortSpec]:
    ports: list[PortSpec] = []
    for value in unit.values(unit.type_section, "PublishPort"):
        ports.extend(parse_publish(value) or [])
    return ports


def listening_ports() -> set[tuple[int, str]]:
    """(port, proto) pairs something on this host is already bound to.

    Reads /proc/net directly: psutil.net_connections also maps every socket to its process by
    scanning all of /proc/*/fd, which costs ~300 ms here for an answer we do not need.
    """
    found: set[tuple[int, str]] = set()
    tables = {"tcp": "0A", "tcp6": "0A", "udp": "07", "udp6": "07"}  # LISTEN / unconnected
    if not Path("/proc/net/tcp").exists():
        return _listening_psutil()
    for table, bound_state in tables.items():
        try:
            lines = Path("/proc/net", table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == bound_state:
                found.add((int(fields[1].rsplit(":", 1)[1], 16), table.rstrip("6")))
    return found


def _listening_psutil() -> set[tuple[int, str]]:
    found: set[tuple[int, str]] = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.laddr and conn.status == psutil.CONN_LISTEN:
            found.add((conn.laddr.port, "tcp"))
        elif conn.laddr and conn.status == psutil.CONN_NONE and conn.type == 2:  # SOCK_DGRAM
            found.add((conn.laddr.port, "udp"))
    return found


def _overlap(a: PortSpec, b: PortSpec) -> bool:
    wild = {"", "::", "0.0.0.0"}  # noqa: S104 - compares, binds nothing
    return (
        a.host == b.host and a.proto == b.proto and (a.ip in wild or b.ip in wild or a.ip == b.ip)
    )


def find_conflicts(
    units: Iterable[Unit],
    *,
    check_host_ports: bool = True,
    own_ports: set[int] | None = None,
) -> list[Finding]:
    """``own_ports``: host ports the deployment being replaced holds, so they are not a clash."""
    units = list(units)
    findings: list[Finding] = []
    findings += _duplicate_names(units)
    findings += _port_clashes(units, check_host_ports, own_ports or set())
    findings += _volumes(units)
    findings += _references(units)
    findings += _cycles(units)
    return findings


def _duplicate_names(units: list[Unit]) -> list[Finding]:
    owners: dict[str, list[str]] = defaultdict(list)
    for unit in units:
        if unit.suffix == ".container":
            owners[container_name(unit)].append(unit.name)
    return [
        Finding(
            "error", files[1], "duplicate-name", f"container name {name!r} also used by {files[0]}"
        )
        for name, files in owners.items()
        if len(files) > 1
    ]


def _port_clashes(units: list[Unit], check_host: bool, own_ports: set[int]) -> list[Finding]:
    findings: list[Finding] = []
    seen: list[tuple[PortSpec, str]] = []
    listening = listening_ports() if check_host else set()
    for unit in units:
        for spec in published_ports(unit):
            for other, owner in seen:
                if _overlap(spec, other):
                    findings.append(
                        Finding(
                            "error",
                            unit.name,
                            "port",
                            f"host port {spec.host}/{spec.proto} is also published by {owner}",
                        )
                    )
            seen.append((spec, unit.name))
            if (spec.host, spec.proto) in listening and spec.host not in own_ports:
                findings.append(
                    Finding(
                        "error",
                        unit.name,
                        "port-in-use",
                        f"host port {spec.host}/{spec.proto} is already listening on this host",
                    )
                )
    return findings


def _volumes(units: list[Unit]) -> list[Finding]:
    findings: list[Finding] = []
    defined: dict[str, str] = {}
    for unit in units:
        if unit.suffix == ".volume":
            name = volume_name(unit)
            if name in defined:
                findings.append(
                    Finding(
                        "error",
                        unit.name,
                        "volume",
                        f"volume {name!r} also defined by {defined[name]}",
                    )
                )
            defined.setdefault(name, unit.name)
    users: dict[str, list[str]] = defaultdict(list)
    for unit in units:
        if unit.suffix == ".container":
            for name in set(volumes_used(unit)):
                users[name].append(unit.name)
    for name, files in users.items():
        if len(files) > 1:
            findings.append(
                Finding(
                    "error",
                    files[1],
                    "volume",
                    f"volume {name!r} is claimed by {', '.join(files)}; give each service its own",
                )
            )
    return findings


def _references(units: list[Unit]) -> list[Finding]:
    """A quadlet reference (``Network=x.network``) must name a file in the set. Plain systemd
    units (``network-online.target``, host services) are the host's business, never missing."""
    present = {unit.name for unit in units}
    findings: list[Finding] = []
    for unit in units:
        for key, suffix in _REFERENCE_KEYS.items():
            for value in unit.values(unit.type_section, key):
                target = value.split(":", 1)[0]
                if target.endswith(suffix) and target not in present:
                    findings.append(
                        Finding(
                            "error",
                            unit.name,
                            "missing",
                            f"{key}={value} refers to {target}, which is not in the set",
                        )
                    )
    return findings


def _edges(units: list[Unit]) -> dict[str, set[str]]:
    by_service = {unit.service_name: unit for unit in units}
    by_file = {unit.name: unit for unit in units}
    graph: dict[str, set[str]] = {unit.name: set() for unit in units}
    for unit in units:
        for key in _DEPENDENCY_KEYS:
            for value in unit.values("Unit", key):
                for dep in value.split():
                    target = by_service.get(dep) or by_file.get(dep)
                    if target is not None and target.name != unit.name:
                        graph[unit.name].add(target.name)
        for key, suffix in _REFERENCE_KEYS.items():
            for value in unit.values(unit.type_section, key):
                target_name = value.split(":", 1)[0]
                if target_name.endswith(suffix) and target_name in by_file:
                    graph[unit.name].add(target_name)
    return graph


def _cycles(units: list[Unit]) -> list[Finding]:
    graph = _edges(units)
    state: dict[str, int] = {}  # 1 visiting, 2 done
    findings: list[Finding] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                findings.append(
                    Finding("error", node, "cycle", "dependency cycle: " + " -> ".join(cycle))
                )
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return findings


def is_quadlet(name: str) -> bool:
    return any(name.endswith(suffix) for suffix in QUADLET_TYPES)
