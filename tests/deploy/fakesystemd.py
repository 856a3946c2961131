"""A stand-in for systemd as PID 1, which this container cannot have.

Installed on PATH as ``systemctl`` and ``journalctl`` (see ``install``). It speaks their
command lines and exit codes and records every call to ``$FAKE_SYSTEMD_DIR/calls.jsonl``.
``daemon-reload`` runs the real quadlet generator; ``start`` runs the generated ``ExecStart=``
lines with the real Podman (after ``Requires=`` units), ``stop`` the ``ExecStop=`` lines;
``is-active`` asks Podman whether the container runs. Two adaptations for this machine:
``--cgroups=split`` is dropped (no systemd cgroup to split) and ``--ignore`` of Podman 5's
``volume/network create`` is replaced by "already exists is fine" (Podman 4.3 lacks the flag);
a stale ``--cidfile`` left by Podman 4.3 is removed before a start.

``FAKE_SYSTEMD_MODE=record`` only records and reports every started unit active (for
benchmarks that measure leger, not Podman).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SYSTEMD_DIR", "/tmp/fakesystemd"))
UNITS = STATE / "units"
ACTIVE = STATE / "active"
RECORD_ONLY = os.environ.get("FAKE_SYSTEMD_MODE") == "record"


def record(argv: list[str]) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / "calls.jsonl").open("a") as fh:
        fh.write(json.dumps({"argv": argv, "ts": time.time()}) + "\n")


def unit_file(name: str) -> dict[str, list[str]]:
    path = UNITS / name
    entries: dict[str, list[str]] = {}
    if not path.exists():
        return entries
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def expand(command: str, unit: str) -> list[str]:
    runtime = STATE / "run"
    runtime.mkdir(parents=True, exist_ok=True)
    command = command.lstrip("-")
    text = command.replace("%t", str(runtime)).replace("%N", unit.removesuffix(".service"))
    args = [a for a in shlex.split(text.replace("%n", unit)) if a != "--cgroups=split"]
    return args


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    if (
        len(args) > 3
        and args[1] in {"volume", "network"}
        and args[2] == "create"
        and "--ignore" in args
    ):
        args = [a for a in args if a != "--ignore"]
        exists = subprocess.run([args[0], args[1], "exists", args[-1]], capture_output=True)
        if exists.returncode == 0:
            return subprocess.CompletedProcess(args, 0, "", "")
    return subprocess.run(args, capture_output=True, text=True)


def container_of(unit: str) -> str | None:
    for command in unit_file(unit).get("ExecStart", []):
        args = expand(command, unit)
        if "--name" in args:
            return args[args.index("--name") + 1]
    return None


def is_active(unit: str) -> str:
    marker = ACTIVE / unit
    if not marker.exists():
        return "inactive"
    if RECORD_ONLY:
        return "active"
    name = container_of(unit)
    if name is None:
        return "active"  # oneshot units (volumes, networks) stay active once run
    proc = subprocess.run(
        ["podman", "container", "inspect", name, "--format", "{{.State.Running}}"],
        capture_output=True,
        text=True,
    )
    return "active" if proc.stdout.strip() == "true" else "failed"


def start(unit: str, seen: set[str]) -> str | None:
    if unit in seen:
        return None
    seen.add(unit)
    entries = unit_file(unit)
    if not entries:
        return None  # units systemd itself provides (targets) need nothing here
    for dep in " ".join(entries.get("Requires", [])).split():
        if (UNITS / dep).exists():
            error = start(dep, seen)
            if error:
                return f"dependency {dep} failed: {error}"
    if is_active(unit) == "active":
        return None
    ACTIVE.mkdir(parents=True, exist_ok=True)
    # Podman 4.3 leaves the --cidfile behind when a --rm container exits; Podman 5 and a
    # fresh systemd runtime directory do not have that stale file.
    (STATE / "run" / f"{unit.removesuffix('.service')}.cid").unlink(missing_ok=True)
    if not RECORD_ONLY:
        for command in entries.get("ExecStart", []):
            proc = run(expand(command, unit))
            if proc.returncode != 0:
                (ACTIVE / unit).unlink(missing_ok=True)
                return (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}"
    (ACTIVE / unit).write_text("started")
    return None


def stop(unit: str) -> None:
    entries = unit_file(unit)
    if not RECORD_ONLY:
        for key in ("ExecStop", "ExecStopPost"):
            for command in entries.get(key, []):
                run(expand(command, unit))
    (ACTIVE / unit).unlink(missing_ok=True)


def systemctl(args: list[str]) -> int:
    args = [a for a in args if a not in {"--user", "--no-pager", "--quiet", "-q"}]
    if not args:
        print("fake systemctl: no command", file=sys.stderr)
        return 1
    command, units = args[0], args[1:]
    if command == "daemon-reload":
        quadlet_dir = os.environ.get("LEGER_QUADLET_DIR", "")
        shutil.rmtree(UNITS, ignore_errors=True)
        UNITS.mkdir(parents=True)
        generator = os.environ["FAKE_SYSTEMD_GENERATOR"]
        proc = subprocess.run(
            [generator, "-user", str(UNITS)],
            env={**os.environ, "QUADLET_UNIT_DIRS": quadlet_dir},
            capture_output=True,
            text=True,
        )
        return 0 if proc.returncode == 0 else (print(proc.stderr, file=sys.stderr) or 1)
    if command == "start":
        for unit in units:
            if not (UNITS / unit).exists():
                print(f"Failed to start {unit}: Unit {unit} not found.", file=sys.stderr)
                return 5
            error = start(unit, set())
            if error:
                print(f"Job for {unit} failed: {error}", file=sys.stderr)
                return 1
        return 0
    if command == "stop":
        for unit in units:
            stop(unit)
        return 0
    if command == "restart":
        for unit in units:
            stop(unit)
        return systemctl(["start", *units])
    if command == "is-active":
        states = [is_active(unit) for unit in units]
        print("\n".join(states))
        return 0 if all(s == "active" for s in states) else 3
    if command == "status":
        for unit in units:
            print(f"* {unit}\n   Active: {is_active(unit)}")
            for line in unit_file(unit).get("ExecStart", []):
                print(f"   ExecStart={line}")
        return 0 if all(is_active(u) == "active" for u in units) else 3
    print(f"fake systemctl: unsupported command {command}", file=sys.stderr)
    return 1


def journalctl(args: list[str]) -> int:
    units, lines, follow = [], "10", False
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "-u":
            units.append(args[index + 1])
            index += 1
        elif arg == "-n":
            lines = args[index + 1]
            index += 1
        elif arg == "-f":
            follow = True
        index += 1
    for unit in units:
        name = container_of(unit)
        if name and not RECORD_ONLY:
            cmd = ["podman", "logs", "--tail", lines] + (["-f"] if follow else []) + [name]
            subprocess.run(cmd)
    return 0


def main() -> None:
    tool = Path(sys.argv[0]).name
    record([tool, *sys.argv[1:]])
    sys.exit(systemctl(sys.argv[1:]) if tool == "systemctl" else journalctl(sys.argv[1:]))


def install(bin_dir: Path, python: str = sys.executable) -> None:
    """Put ``systemctl`` and ``journalctl`` wrappers running this module into ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("systemctl", "journalctl"):
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\nexec {python} {Path(__file__).resolve()} "$0" "$@"\n')
        path.chmod(0o755)


if __name__ == "__main__":
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    main()
