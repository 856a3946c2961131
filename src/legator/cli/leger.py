"""``leger``: the host side of Deploy. Pulls rendered quadlets from the control plane (or git,
or a directory), validates, stages, installs and rolls back, with secrets from legerd."""

from __future__ import annotations

from pathlib import Path

import typer

from legator.cli import (
    leger_auth,
    leger_backup,
    leger_config,
    leger_deploy,
    leger_service,
    leger_staged,
)
from legator.cli.common import console, print_json, print_table
from legator.cli.leger_common import JSON_OPTION, SYSTEM_OPTION, deployer, guard, scope
from legator.cli.leger_secrets import app as secrets_app
from legator.deploy import staging
from legator.deploy.client import load_login
from legator.deploy.quadlet.check import Report, conflicts_dir, validate_dir

app = typer.Typer(
    name="leger",
    help="Leger: deploy Podman quadlets with secrets, staged updates, backups and rollback.\n\n"
    "Exit codes: 0 ok, 1 failed or invalid, 2 usage, 3 not found, 4 conflict, 5 rolled back.",
    add_completion=False,
    no_args_is_help=True,
)
app.add_typer(leger_auth.app, name="auth")
app.add_typer(leger_config.app, name="config")
app.add_typer(leger_deploy.app, name="deploy")
app.add_typer(leger_staged.app, name="staged")
app.add_typer(leger_backup.app, name="backup")
app.add_typer(leger_service.app, name="service")
app.add_typer(secrets_app, name="secrets")

DIR_ARGUMENT = typer.Argument(
    Path("."), help="Directory of quadlet files.", exists=True, file_okay=False
)


def _print_report(report: Report, as_json: bool, title: str) -> None:
    if as_json:
        print_json(report.as_dict())
    elif report.findings:
        print_table(
            title,
            ["level", "unit", "line", "check", "message"],
            [(f.level, f.unit, f.line or "", f.check, f.message) for f in report.findings],
        )
    if not as_json:
        verdict = "[green]ok[/green]" if report.ok else "[red]invalid[/red]"
        console.print(f"{len(report.units)} units: {verdict}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def validate(
    directory: Path = DIR_ARGUMENT,
    system: bool = typer.Option(False, "--system", help="Run the generator in system mode."),
    no_generator: bool = typer.Option(False, "--no-generator", help="Skip the generator dry run."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Syntax and keys per quadlet type, then the real quadlet generator's dry run.
    Exit 1 on any error."""
    report = validate_dir(directory, generator=not no_generator, user=not system)
    _print_report(report, as_json, "validation")


@app.command("check-conflicts")
def check_conflicts(
    directory: Path = DIR_ARGUMENT,
    no_host_ports: bool = typer.Option(
        False, "--no-host-ports", help="Do not compare with ports listening on this host."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Duplicate container names, host port clashes (in the set and with listening ports),
    volumes claimed twice, missing quadlet references, dependency cycles. Exit 1 on any."""
    report = conflicts_dir(directory, check_host_ports=not no_host_ports)
    _print_report(report, as_json, "conflicts")


@app.command()
def status(system: bool = SYSTEM_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Daemon, login, deployments, staged updates and services on one screen."""
    where = scope(system)
    login = guard(lambda: load_login(where.auth_file))
    dep = deployer(system)
    deployments = dep.deployments.load()
    units = [unit for item in deployments.values() for unit in item.services]
    services = guard(lambda: dep.systemd.states(units))
    staged = staging.list_staged(where.staged)
    info = {
        # The legerd connection is reported by the secrets issue's adapter; until then the
        # secret source in use is shown.
        "secrets_source": dep.secrets.describe(),
        "auth": login.public() if login else None,
        "deployments": {
            n: {"version": d.version, "source": d.source} for n, d in deployments.items()
        },
        "staged": {s.name: s.manifest.version for s in staged},
        "services": services,
    }
    if as_json:
        print_json(info)
        return
    console.print(f"[bold]secrets[/bold]  {info['secrets_source']}")
    auth = "not logged in" if login is None else f"{login.username} @ {login.server}"
    if login and login.expired:
        auth += " [red](expired)[/red]"
    console.print(f"[bold]auth[/bold]     {auth}")
    print_table(
        "deployments",
        ["name", "version", "source", "staged"],
        [
            (n, d.version, d.source, info["staged"].get(n, "-"))  # type: ignore[union-attr]
            for n, d in deployments.items()
        ],
    )
    print_table("services", ["unit", "state"], sorted(services.items()))


def main() -> None:
    app()
