"""``leger deploy``: install, list, update and remove deployments on this host."""

from __future__ import annotations

import os
from typing import Any

import typer

from legator.cli.common import console, print_json, print_table
from legator.cli.leger_common import JSON_OPTION, SYSTEM_OPTION, deployer, die, guard, scope, steps
from legator.deploy.backups import DEFAULT_KEEP_BACKUPS
from legator.deploy.client import load_login
from legator.deploy.installer import Options, Plan, Result, install
from legator.deploy.sources import resolve
from legator.deploy.state import check_name

app = typer.Typer(help="Install and manage deployments on this host.", no_args_is_help=True)

HEALTH_OPTION = typer.Option(30.0, "--health-timeout", min=0.5, help="Seconds to wait for health.")
KEEP_BACKUPS_OPTION = typer.Option(
    None,
    "--keep-backups",
    min=0,
    show_default=False,
    help="Automatic backups of the deployment to keep after a successful apply, newest first "
    f"(0: all; default $LEGER_KEEP_BACKUPS, else {DEFAULT_KEEP_BACKUPS}).",
)


def keep_backups(flag: int | None) -> int:
    """``--keep-backups``, else ``LEGER_KEEP_BACKUPS``, else the default."""
    if flag is not None:
        return flag
    raw = os.environ.get("LEGER_KEEP_BACKUPS")
    if not raw:
        return DEFAULT_KEEP_BACKUPS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        die(f"LEGER_KEEP_BACKUPS={raw!r} is not a number of backups (0 keeps all)", 2)
    return value


def _show_plan(plan: Plan, *, dry_run: bool) -> None:
    head = "would apply" if dry_run else "applied"
    console.print(f"{head} {plan.name} version {plan.version}")
    for label, items in (
        ("add", plan.add),
        ("change", plan.change),
        ("remove", plan.remove),
        ("stop", plan.stop),
        ("start", plan.start),
        ("secrets", plan.secrets),
    ):
        if items:
            console.print(f"  {label}: {', '.join(items)}")
    for warning in plan.warnings:
        console.print(f"  [yellow]warning:[/yellow] {warning}")


def _report(result: Result, as_json: bool, dry_run: bool) -> None:
    if as_json:
        print_json(
            {
                "applied": result.applied,
                "plan": vars(result.plan),
                "backup": result.backup.id if result.backup else None,
                "states": result.states,
                "pruned_backups": result.pruned,
            }
        )
    else:
        _show_plan(result.plan, dry_run=dry_run)
        if result.backup:
            console.print(f"  backup: {result.backup.id}")
        if result.pruned:
            console.print(f"  pruned old backups: {', '.join(result.pruned)}")


@app.command("install")
def install_cmd(
    name: str = typer.Argument("default", help="Deployment name."),
    source: str | None = typer.Option(
        None,
        "--source",
        help="A directory, a git URL (GitHub/GitLab tree URLs, or URL#BRANCH:SUBPATH) or "
        "leger:VERSION; default: the control plane's latest rendered version.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show the plan only."),
    no_start: bool = typer.Option(False, "--no-start", help="Install and reload, start nothing."),
    force: bool = typer.Option(False, "--force", help="Take over files and ignore conflicts."),
    no_secrets: bool = typer.Option(False, "--no-secrets", help="Do not create Podman secrets."),
    system: bool = SYSTEM_OPTION,
    health_timeout: float = HEALTH_OPTION,
    keep: int | None = KEEP_BACKUPS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Fetch, verify, validate and install a deployment, then start it and check its health.
    A missing secret stops the install before anything changes; a failed start rolls back.
    Once applied, automatic backups past the newest --keep-backups are pruned."""
    guard(lambda: check_name(name))
    where = scope(system)
    opts = Options(
        start=not no_start,
        force=force,
        secrets=not no_secrets,
        dry_run=dry_run,
        health_timeout=health_timeout,
        keep_backups=keep_backups(keep),
    )

    def run() -> Result:
        with steps(f"installing {name}", quiet=as_json) as progress:
            progress("fetching")
            fetched = resolve(source, load_login(where.auth_file))
            return install(
                deployer(system, progress), name, fetched, source or "leger:latest", opts
            )

    _report(guard(run), as_json, dry_run)


@app.command("update")
def update_cmd(
    name: str = typer.Argument("default", help="Deployment name."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show the plan only."),
    system: bool = SYSTEM_OPTION,
    health_timeout: float = HEALTH_OPTION,
    keep: int | None = KEEP_BACKUPS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Fetch the deployment's source again and apply it (backup, rollback on failure)."""
    where = scope(system)
    current = deployer(system).deployments.get(name)
    if current is None:
        die(f"no deployment {name!r}", 3)
    opts = Options(
        start=current.started,
        dry_run=dry_run,
        health_timeout=health_timeout,
        keep_backups=keep_backups(keep),
    )

    def run() -> Result:
        with steps(f"updating {name}", quiet=as_json) as progress:
            progress("fetching")
            fetched = resolve(current.source, load_login(where.auth_file))
            return install(deployer(system, progress), name, fetched, current.source, opts)

    _report(guard(run), as_json, dry_run)


@app.command("list")
def list_cmd(system: bool = SYSTEM_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Installed deployments with the real state of each service and their host ports."""
    dep = deployer(system)
    rows: list[dict[str, Any]] = []
    for item in dep.deployments.load().values():
        states = guard(lambda item=item: dep.systemd.states(item.services))
        rows.append({**item.model_dump(exclude={"secrets"}), "states": states})
    if as_json:
        print_json(rows)
        return
    print_table(
        "deployments",
        ["name", "version", "services", "ports", "source", "updated"],
        [
            (
                row["name"],
                row["version"],
                ", ".join(f"{u.removesuffix('.service')}={s}" for u, s in row["states"].items()),
                ", ".join(map(str, row["ports"])) or "-",
                row["source"],
                row["updated_at"],
            )
            for row in rows
        ],
    )


@app.command("remove")
def remove_cmd(
    name: str = typer.Argument(..., help="Deployment name."),
    remove_volumes: bool = typer.Option(False, "--remove-volumes", help="Delete its volumes too."),
    backup_volumes: bool = typer.Option(
        False, "--backup-volumes", help="Back up files and volumes, then delete the volumes."
    ),
    system: bool = SYSTEM_OPTION,
) -> None:
    """Stop the services, remove the quadlets and the secrets only it used. Volumes are kept
    unless --remove-volumes or --backup-volumes."""
    with steps(f"removing {name}") as progress:
        backup = guard(
            lambda: deployer(system, progress).remove(
                name, remove_volumes=remove_volumes, backup_volumes=backup_volumes
            )
        )
    console.print(f"removed {name}" + (f"; backup {backup.id}" if backup else ""))
