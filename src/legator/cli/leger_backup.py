"""``leger backup``: quadlets plus named volumes, created before every change or by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer

from legator.cli.common import EXIT_FAILED, console, print_json, print_table, to_jsonable
from legator.cli.leger_common import JSON_OPTION, SYSTEM_OPTION, deployer, die, guard, steps
from legator.cli.leger_deploy import keep_backups
from legator.deploy.backups import DEFAULT_KEEP_BACKUPS, BackupInfo
from legator.deploy.installer import Deployer, DeployError

app = typer.Typer(help="Back up and restore deployments.", no_args_is_help=True)
T = TypeVar("T")


def locked(dep: Deployer, action: Callable[[], T], interrupted: str) -> T:
    """``action`` holding the state lock that apply and restore hold, its errors as exit
    codes. A stop signal (SIGTERM, Ctrl-C, SIGHUP) ends it with exit 1 and ``interrupted``."""

    def run() -> T:
        with dep.hold_lock():
            return action()

    try:
        return guard(run)
    except KeyboardInterrupt as exc:
        die(f"{exc or 'interrupted'}; {interrupted}", EXIT_FAILED)


@app.command("create")
def create_cmd(name: str = typer.Argument("default"), system: bool = SYSTEM_OPTION) -> None:
    """Back up a deployment's files and volumes (podman volume export). Written to a
    temporary folder and renamed into place: one interrupted leaves no backup half-written."""
    dep = deployer(system)

    def create() -> BackupInfo:
        current = dep.deployments.get(name)
        if current is None:
            raise DeployError(f"no deployment {name!r}")
        return dep.backups.create(
            name,
            current.version,
            dep.active_files(name),
            current.volumes,
            reason="manual",
            automatic=False,
        )

    with steps(f"backing up {name}"):
        info = locked(dep, create, "no backup was kept")
    console.print(
        f"backup {info.id}: {len(info.files)} files, volumes {', '.join(info.volumes) or '-'}"
    )


def prune_backups(dep: Deployer, name: str | None, keep: int, dry_run: bool) -> list[BackupInfo]:
    """What ``backup prune`` removes (``dry_run``: would remove), deployment by deployment."""
    names = sorted({b.deployment for b in dep.backups.list(name)})
    if name is not None and not names and dep.deployments.get(name) is None:
        raise DeployError(f"no deployment {name!r}")
    pruned: list[BackupInfo] = []
    for each in names:
        record = dep.deployments.get(each)
        protect = dep.backups.way_back(each, record.version if record else None)
        if dry_run:
            pruned += dep.backups.doomed(each, keep, protect=protect)
        else:
            pruned += dep.backups.prune(each, keep, protect=protect)
    return pruned


@app.command("prune")
def prune_cmd(
    name: str | None = typer.Argument(None, help="Only this deployment's backups."),
    keep: int | None = typer.Option(
        None,
        "--keep",
        min=0,
        show_default=False,
        help="Automatic backups to keep per deployment, newest first (0: all; default "
        f"$LEGER_KEEP_BACKUPS, else {DEFAULT_KEEP_BACKUPS}).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would go; remove nothing."),
    system: bool = SYSTEM_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete old automatic backups by the rules of an apply: the newest --keep of each
    deployment stay, and so do the newest holding its recorded version and the one its
    last apply replaced. Manual backups are never deleted."""
    count = keep_backups(keep)
    dep = deployer(system)
    pruned = locked(
        dep,
        lambda: prune_backups(dep, name, count, dry_run),
        "pruning stopped; the backups not yet deleted are kept",
    )
    if as_json:
        print_json({"dry_run": dry_run, "pruned": to_jsonable(pruned)})
        return
    verb = "would remove" if dry_run else "removed"
    if not pruned:
        console.print(f"nothing to prune (keeping {count or 'all'} automatic backups)")
        return
    print_table(
        "backups " + verb,
        ["id", "deployment", "version", "created", "reason", "bytes"],
        [(b.id, b.deployment, b.version, b.created_at, b.reason, b.size) for b in pruned],
    )
    total = sum(b.size for b in pruned)
    console.print(f"{verb} {len(pruned)} backups, {total} bytes")


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
