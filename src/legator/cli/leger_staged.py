"""``leger staged``: download and verify an update now, look at it, apply it later."""

from __future__ import annotations

import typer
from rich.syntax import Syntax

from legator.cli.common import console, print_json, print_table
from legator.cli.leger_common import JSON_OPTION, SYSTEM_OPTION, deployer, guard, scope, steps
from legator.cli.leger_deploy import HEALTH_OPTION, KEEP_BACKUPS_OPTION, _report, keep_backups
from legator.deploy import staging
from legator.deploy.client import load_login
from legator.deploy.diff import affected_services, changed_files, unified
from legator.deploy.installer import Result, apply_staged, discard_staged, stage_update
from legator.deploy.sources import resolve

app = typer.Typer(help="Staged updates: stage, list, diff, apply, discard.", no_args_is_help=True)


@app.command("stage")
def stage_cmd(
    name: str = typer.Argument("default", help="Deployment name."),
    source: str | None = typer.Option(
        None,
        "--source",
        help="Where from (as for `deploy install`); default: the deployment's source.",
    ),
    system: bool = SYSTEM_OPTION,
) -> None:
    """Download every file, verify every checksum into a temporary directory, then move it
    into staged/NAME atomically. Nothing running changes."""
    where = scope(system)
    dep = deployer(system)
    current = dep.deployments.get(name)
    origin = source or (current.source if current else None)

    def run() -> staging.Staged:
        with steps(f"staging {name}") as progress:
            progress("downloading and verifying")
            fetched = resolve(origin, load_login(where.auth_file))
            fetched.source = origin or "leger:latest"
            dep.progress = progress
            return stage_update(dep, name, fetched)

    staged = guard(run)
    console.print(
        f"staged {name} version {staged.manifest.version}: "
        f"{len(staged.manifest.files)} files verified"
    )


@app.command("list")
def list_cmd(system: bool = SYSTEM_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Staged updates waiting to be applied."""
    items = guard(lambda: staging.list_staged(scope(system).staged))
    rows = [
        {
            "name": s.name,
            "version": s.manifest.version,
            "files": len(s.manifest.files),
            "source": s.source,
            "staged_at": s.staged_at,
        }
        for s in items
    ]
    if as_json:
        print_json(rows)
    else:
        print_table(
            "staged updates",
            ["name", "version", "files", "source", "staged"],
            [tuple(row.values()) for row in rows],
        )


@app.command("diff")
def diff_cmd(
    name: str = typer.Argument("default", help="Deployment name."),
    system: bool = SYSTEM_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """A coloured unified diff from the active files to the staged ones, and the services it
    affects."""
    dep = deployer(system)
    staged = guard(lambda: staging.load(dep.layout.staged, name))
    new = guard(staged.files)
    old = dep.active_files(name)
    changed = changed_files(old, new)
    text = unified(old, new, label=("active", "staged"))
    affected = affected_services(changed)
    if as_json:
        print_json({"changed_files": changed, "affected_services": affected, "diff": text})
        return
    if not changed:
        console.print("no changes")
        return
    console.print(Syntax(text, "diff", theme="ansi_dark", background_color="default"))
    console.print(f"affected services: {', '.join(affected) or '-'}")


@app.command("apply")
def apply_cmd(
    name: str = typer.Argument("default", help="Deployment name."),
    system: bool = SYSTEM_OPTION,
    force: bool = typer.Option(False, "--force", help="Take over files and ignore conflicts."),
    health_timeout: float = HEALTH_OPTION,
    keep: int | None = KEEP_BACKUPS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Back up, stop affected services, swap, install, reload, start, check health; roll back
    files and volumes automatically if anything fails (exit 5). Then prune the automatic
    backups past the newest --keep-backups."""
    keep_count = keep_backups(keep)

    def run() -> Result:
        with steps(f"applying {name}", quiet=as_json) as progress:
            return apply_staged(
                deployer(system, progress),
                name,
                force=force,
                health_timeout=health_timeout,
                keep_backups=keep_count,
            )

    _report(guard(run), as_json, dry_run=False)


@app.command("discard")
def discard_cmd(name: str = typer.Argument("default"), system: bool = SYSTEM_OPTION) -> None:
    """Throw a staged update away."""
    guard(lambda: discard_staged(deployer(system), name))
    console.print(f"discarded staged {name}")
