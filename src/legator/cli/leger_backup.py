"""``leger backup``: quadlets plus named volumes, created before every change or by hand."""

from __future__ import annotations

import typer

from legator.cli.common import console, print_json, print_table
from legator.cli.leger_common import JSON_OPTION, SYSTEM_OPTION, deployer, die, guard, steps

app = typer.Typer(help="Back up and restore deployments.", no_args_is_help=True)


@app.command("create")
def create_cmd(name: str = typer.Argument("default"), system: bool = SYSTEM_OPTION) -> None:
    """Back up a deployment's files and volumes (podman volume export)."""
    dep = deployer(system)
    current = dep.deployments.get(name)
    if current is None:
        die(f"no deployment {name!r}", 3)
    with steps(f"backing up {name}"):
        info = guard(
            lambda: dep.backups.create(
                name,
                current.version,
                dep.active_files(name),
                current.volumes,
                reason="manual",
                automatic=False,
            )
        )
    console.print(
        f"backup {info.id}: {len(info.files)} files, volumes {', '.join(info.volumes) or '-'}"
    )


@app.command("list")
def list_cmd(
    name: str | None = typer.Argument(None, help="Only this deployment's backups."),
    system: bool = SYSTEM_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Every backup, newest first: manual ones, and the automatic ones an apply kept (the
    newest --keep-backups of each deployment, and the only copies of its recorded and
    previous version)."""
    items = deployer(system).backups.list(name)
    if as_json:
        print_json(items)
        return
    print_table(
        "backups",
        ["id", "deployment", "version", "created", "kind", "reason", "volumes", "bytes"],
        [
            (
                b.id,
                b.deployment,
                b.version,
                b.created_at,
                "auto" if b.automatic else "manual",
                b.reason,
                ", ".join(b.volumes) or "-",
                b.size,
            )
            for b in items
        ],
    )


@app.command("info")
def info_cmd(backup_id: str, system: bool = SYSTEM_OPTION, as_json: bool = JSON_OPTION) -> None:
    """What one backup holds."""
    info = guard(lambda: deployer(system).backups.info(backup_id))
    if as_json:
        print_json(info)
        return
    for key, value in info.model_dump().items():
        console.print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


@app.command("restore")
def restore_cmd(backup_id: str, system: bool = SYSTEM_OPTION) -> None:
    """Stop the deployment, put the backup's files back, recreate and import its volumes,
    reload and start."""
    with steps(f"restoring {backup_id}"):
        info = guard(lambda: deployer(system).restore(backup_id))
    console.print(f"restored {info.deployment} version {info.version} from {info.id}")
