"""Everything ``leger validate`` and ``leger check-conflicts`` report, for a directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from legator.deploy.quadlet.conflicts import find_conflicts
from legator.deploy.quadlet.generator import dry_run
from legator.deploy.quadlet.parse import Unit, load_dir
from legator.deploy.quadlet.validate import Finding, validate_unit


@dataclass
class Report:
    units: list[Unit] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    generator: str | None = None

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "units": [unit.name for unit in self.units],
            "generator": self.generator,
            "findings": [f.as_dict() for f in self.findings],
        }


def validate_dir(directory: Path, *, generator: bool = True, user: bool = True) -> Report:
    units, errors = load_dir(directory)
    report = Report(units=units)
    report.findings += [Finding("error", e.path, "syntax", e.message, e.line) for e in errors]
    for unit in units:
        report.findings += validate_unit(unit)
    if generator and units:
        run = dry_run(directory, user=user)
        report.generator = run.generator
        if run.ran:
            report.findings += run.findings
        else:
            report.findings.append(
                Finding("warning", "-", "generator", "no quadlet generator found; dry run skipped")
            )
    return report


def conflicts_dir(
    directory: Path, *, check_host_ports: bool = True, own_ports: set[int] | None = None
) -> Report:
    units, errors = load_dir(directory)
    report = Report(units=units)
    report.findings += [Finding("error", e.path, "syntax", e.message, e.line) for e in errors]
    report.findings += find_conflicts(units, check_host_ports=check_host_ports, own_ports=own_ports)
    return report
