"""``leger service``: systemctl and journalctl for a deployment's services."""

from __future__ import annotations

import subprocess

import typer

from legator.cli.common import console
from legator.cli.leger_common import SYSTEM_OPTION, guard
from legator.deploy.systemd import Systemd

app = typer.Typer(help="Start, stop and inspect services (systemd units).", no_args_is_help=True)

SERVICES = typer.Argument(..., help="Service names, e.g. redis (or redis.service).")


def _units(services: list[str]) -> list[str]:
    return [s if "." in s else f"{s}.service" for s in services]


def _do(verb: str, services: list[str], system: bool) -> None:
    systemd = Systemd(system=system)
    result = guard(lambda: systemd.run(verb, *_units(services), check=False))
    if result.stdout:
        console.print(result.stdout.rstrip(), highlight=False)
    if result.returncode != 0:
        console.print(result.stderr.rstrip(), style="red", highlight=False)
        raise typer.Exit(1)


@app.command()
def start(services: list[str] = SERVICES, system: bool = SYSTEM_OPTION) -> None:
    """Start services."""
    _do("start", services, system)


@app.command()
def stop(services: list[str] = SERVICES, system: bool = SYSTEM_OPTION) -> None:
    """Stop services."""
    _do("stop", services, system)


@app.command()
def restart(services: list[str] = SERVICES, system: bool = SYSTEM_OPTION) -> None:
    """Restart services."""
    _do("restart", services, system)


@app.command()
def status(services: list[str] = SERVICES, system: bool = SYSTEM_OPTION) -> None:
    """systemctl status, shown as is (exit 3 if a unit is not active, as systemctl does)."""
    systemd = Systemd(system=system)
    result = guard(lambda: systemd.status(_units(services)))
    console.print(result.stdout.rstrip(), highlight=False)
    raise typer.Exit(0 if result.returncode == 0 else 3)


@app.command()
def logs(
    services: list[str] = SERVICES,
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines."),
    lines: int = typer.Option(50, "-n", "--lines", min=1, help="How many recent lines."),
    system: bool = SYSTEM_OPTION,
) -> None:
    """journalctl for the services; the output goes straight to your terminal."""
    args = guard(
        lambda: Systemd(system=system).journal_args(_units(services), lines=lines, follow=follow)
    )
    try:
        raise typer.Exit(subprocess.run(args).returncode)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
