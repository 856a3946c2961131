"""``legator``: run the control plane and administer it."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from legator.cli import brain as brain_cli
from legator.cli import fleet as fleet_cli
from legator.cli import models as models_cli
from legator.cli import usage as usage_cli
from legator.cli.approvals import app as approvals_app
from legator.cli.common import (
    EXIT_CONFLICT,
    EXIT_USAGE,
    console,
    err_console,
    fail,
    fmt_time,
    one_line,
    parse_duration,
    print_json,
    print_table,
    read_secret,
    run_async,
    validation_message,
)
from legator.cli.offline import backup_database, offline_auth, offline_database_url
from legator.cli.online import LegatorGroup
from legator.core.auth.permissions import Role
from legator.core.auth.schemas import UserCreate, UserUpdate
from legator.core.config import ConfigError, Settings, load_settings
from legator.core.db import Database, utcnow
from legator.core.db.migrate import current_revision, head_revision, new_revision, upgrade
from legator.core.errors import BadRequest
from legator.core.security import random_password
from legator.core.version import build_info

app = typer.Typer(
    name="legator",
    help="Legator control plane: serve it, and administer users, keys and the database.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    cls=LegatorGroup,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
users_app = typer.Typer(
    help="Users (offline: works on the data dir directly).", no_args_is_help=True
)
keys_app = typer.Typer(
    help="API keys (offline: works on the data dir directly).", no_args_is_help=True
)
secrets_app = typer.Typer(
    help="The control plane's secrets store (offline: works on the database directly).",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
app.add_typer(secrets_app, name="secrets")
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(fleet_cli.tokens_app, name="tokens")
app.add_typer(fleet_cli.probes_app, name="probes")
app.command("run")(fleet_cli.run)
app.command("chat")(brain_cli.chat)
app.command("task")(brain_cli.task)
app.add_typer(approvals_app, name="approvals")
app.add_typer(models_cli.models_app, name="models")
app.add_typer(models_cli.backends_app, name="backends")
app.command("usage")(usage_cli.usage)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="State directory (default: $LEGATOR_DATA_DIR).", show_default=False
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def settings_or_exit(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


@app.command()
def serve(
    addr: Annotated[
        str | None, typer.Option(help="HOST:PORT to listen on (default :8080).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Start the control plane (API, web UI, probe hub)."""
    import uvicorn

    from legator.app import create_app
    from legator.core.http.protocol import GuardedHttpToolsProtocol
    from legator.core.logging import configure_logging
    from legator.core.runtime import build_core

    settings = settings_or_exit(addr=addr, data_dir=data_dir)
    configure_logging(settings.log_level, settings.log_format)
    try:
        core = build_core(settings)
        asgi_app = create_app(core=core)
    except (OSError, ValueError, ConfigError) as exc:
        fail(str(exc), EXIT_USAGE)
    core.startup_hooks.append(settle_heap)  # last: after every wing has started
    config = uvicorn.Config(
        asgi_app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=GuardedHttpToolsProtocol,
        ws="websockets-sansio",
        # Probe messages are small JSON; compression cost CPU at both ends and a zlib
        # context per socket (thousands of them) for little gain.
        ws_per_message_deflate=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.trusted_proxies,
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise typer.Exit(1)


async def settle_heap() -> None:
    """Everything built at start-up (routes, schemas, mappers, caches) lives as long as the
    process: take it out of the cyclic collector's scans, which under load otherwise walked
    the whole heap again and again (a quarter of the gateway's CPU)."""
    gc.collect()
    gc.freeze()
    # A request allocates thousands of short-lived objects: collect the youngest generation
    # every 10,000 allocations rather than every 700.
    gc.set_threshold(10_000, 10, 10)


@app.command()
def version(json_output: JsonFlag = False) -> None:
    """Print version, commit and build date."""
    info = build_info()
    if json_output:
        print_json(info)
    else:
        console.print(f"legator {info['version']} (commit {info['commit']}, {info['date']})")


@app.command()
def backup(
    path: Annotated[Path, typer.Argument(help="Where to write the copy (must not exist).")],
    data_dir: DataDir = None,
) -> None:
    """Make a consistent online copy of the database (safe while the server runs)."""
    settings = settings_or_exit(data_dir=data_dir)
    try:
        size = backup_database(settings, path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except BadRequest as exc:
        fail(exc.message)
    except subprocess.CalledProcessError as exc:
        fail(f"pg_dump failed (exit {exc.returncode}); {path} was not kept")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    console.print(f"backup written to {path} ({size:,} bytes)")


# ----- secrets ---------------------------------------------------------------------------


@secrets_app.command("rotate-kek")
def secrets_rotate_kek(
    new_key_file: Annotated[
        Path | None,
        typer.Option(
            "--new-key-file", help="The new KEK (64 hex) in a file only its owner can read."
        ),
    ] = None,
    finish: Annotated[
        bool,
        typer.Option(
            "--finish",
            help="Second step, once every replica runs with the new LEGATOR_SECRETS_KEK: "
            "drop the old key's wrapping.",
        ),
    ] = False,
) -> None:
    """Rotate the KEK of the store replicas share in PostgreSQL, in two steps (see
    docs/secrets.md). With SQLite, use `legerd rotate-kek --state-dir <secrets dir>`."""
    import psycopg

    from legator.secrets import rotation
    from legator.secrets.crypto import Kek, load_key_file, parse_key
    from legator.secrets.errors import SecretsError

    settings = settings_or_exit()
    if settings.is_sqlite:
        fail(
            "LEGATOR_DATABASE_URL: not PostgreSQL; for a SQLite store use "
            "`legerd rotate-kek --state-dir <secrets dir>`",
            EXIT_USAGE,
        )
    if settings.secrets_kek is None:
        fail("LEGATOR_SECRETS_KEK: required (the key the store is sealed with now)", EXIT_USAGE)
    if (new_key_file is None) == (not finish):
        fail("give either --new-key-file (first step) or --finish (second step)", EXIT_USAGE)
    try:
        raw = settings.secrets_kek.get_secret_value()
        current = Kek(parse_key(raw, "LEGATOR_SECRETS_KEK"), "LEGATOR_SECRETS_KEK")
        if new_key_file is not None:
            new = load_key_file(new_key_file, create=False)
            done = rotation.start(settings.effective_database_url, current, new)
            console.print(
                f"data key wrapped under key {done.key_id} as well; {done.verified} stored "
                "value(s) verified. Now restart every replica with the new "
                "LEGATOR_SECRETS_KEK, then run `legator secrets rotate-kek --finish` with it."
            )
        else:
            done = rotation.finish(settings.effective_database_url, current)
            console.print(
                f"only key {done.key_id} opens the store now; {done.verified} stored value(s) "
                "verified"
            )
    except SecretsError as exc:
        fail(exc.message)
    except psycopg.Error as exc:
        fail(f"PostgreSQL: {one_line(exc)}")

    async def record() -> None:
        async with offline_auth(settings) as auth:
            await auth.audit.log(
                actor="cli",
                action="secrets.rotate_kek",
                target=done.key_id,
                outcome="success",
                details={"step": "finish" if finish else "start", "verified": done.verified},
            )

    run_async(record)


@secrets_app.command("import-sqlite")
def secrets_import_sqlite(
    directory: Annotated[
        Path | None,
        typer.Argument(
            help="The SQLite store's directory (holding secrets.db); default: "
            "$LEGATOR_SECRETS_DIR or <data dir>/secrets, the one `legator serve` warns of.",
            show_default=False,
        ),
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file",
            help="The KEK that store was sealed with (64 hex, a 0600 file); default: "
            "<directory>/keys/main.key.",
            show_default=False,
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Copy the secrets of a SQLite store (one from before the move to PostgreSQL, or another
    replica's) into the store this control plane uses, versions and all. A secret already
    there is left alone: listed as unchanged when it holds the same versions, as a conflict
    (exit 4) when not. Safe to run again."""
    import psycopg

    from legator.secrets.errors import SecretsError
    from legator.secrets.importing import open_sqlite_import
    from legator.secrets.store import ImportReport

    settings = settings_or_exit()

    async def run_import() -> ImportReport:
        # Each secret copied is audited with it, and a finished import once more as a whole.
        # Moving secrets into a new control plane is first-time setup: its database may be new.
        async with offline_auth(settings, create=True) as auth:
            return await job.run(auth.audit)

    try:
        job = open_sqlite_import(settings, directory, key_file)
        try:
            report = run_async(run_import)
        finally:
            job.close()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except SecretsError as exc:
        fail(exc.message)
    except psycopg.Error as exc:
        fail(f"PostgreSQL: {one_line(exc)}")
    if json_output:
        print_json(vars(report))
    else:
        outcomes = [
            *((name, "imported") for name in report.imported),
            *((name, "unchanged (here already)") for name in report.unchanged),
            *(
                (name, "conflict: here already with other values, left alone")
                for name in report.conflicts
            ),
        ]
        print_table("secrets", ["secret", "outcome"], sorted(outcomes))
        console.print(
            f"{len(report.imported)} imported, {len(report.unchanged)} unchanged, "
            f"{len(report.conflicts)} conflict(s) from {job.source_path}"
        )
    if report.conflicts:
        err_console.print(
            f"[red]{len(report.conflicts)} secret(s) differ here and were left alone:[/] "
            + ", ".join(report.conflicts)
        )
        raise typer.Exit(EXIT_CONFLICT)


# ----- db --------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None) -> None:
    """Apply every pending migration (the server also does this at start). A data dir that
    does not exist yet is created, with a new database (first-time setup)."""
    settings = settings_or_exit(data_dir=data_dir)

    async def go() -> str | None:
        db = Database(offline_database_url(settings, create=True))
        try:
            await upgrade(db)
            return await current_revision(db)
        finally:
            await db.dispose()

    console.print(f"database at revision {run_async(go)}")


@db_app.command("current")
def db_current(data_dir: DataDir = None) -> None:
    """Show the database's revision and the newest one this build knows."""
    settings = settings_or_exit(data_dir=data_dir)

    async def go() -> str | None:
        db = Database(offline_database_url(settings))
        try:
            return await current_revision(db)
        finally:
            await db.dispose()

    console.print(f"current: {run_async(go) or '(empty)'}   head: {head_revision()}")


@db_app.command("revision", hidden=True)
def db_revision(message: str) -> None:
    """(Developers) autogenerate a migration from the models."""

    async def go() -> None:
        db = Database("sqlite+aiosqlite://")
        try:
            await new_revision(db, message)
        finally:
            await db.dispose()

    run_async(go)


# ----- users -----------------------------------------------------------------------------


@users_app.command("create")
def users_create(
    username: str,
    role: Annotated[Role, typer.Option(help="admin, operator, viewer or auditor.")] = Role.VIEWER,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Create a user. Without --password-stdin or a terminal, a random password is printed
    once. The first user of a new data dir may be created here: a data dir or database that
    does not exist yet is created (and a line on stderr says so)."""
    settings = settings_or_exit(data_dir=data_dir)
    password = read_secret("Password", from_stdin=password_stdin)
    if password is None and password_stdin:
        fail("--password-stdin: standard input held no password", EXIT_USAGE)
    generated = password is None
    password = password or random_password()
    try:
        data = UserCreate(username=username, password=password, role=role)
    except ValidationError as exc:
        fail(validation_message(exc), EXIT_USAGE)

    async def go() -> None:
        async with offline_auth(settings, create=True) as auth:
            await auth.create_user(data, actor="cli")

    run_async(go)
    console.print(f"user {data.username!r} created with role {role.value}")
    if generated:
        console.print(f"password (shown once): {password}", highlight=False)


@users_app.command("list")
def users_list(data_dir: DataDir = None, json_output: JsonFlag = False) -> None:
    """List users."""
    settings = settings_or_exit(data_dir=data_dir)

    async def go():  # type: ignore[no-untyped-def]
        async with offline_auth(settings) as auth:
            return await auth.list_users()

    users = run_async(go)
    if json_output:
        print_json(users)
        return
    print_table(
        "Users",
        ["username", "role", "disabled", "single sign-on", "created", "last login"],
        [
            (
                u.username,
                u.role,
                "yes" if u.disabled else "no",
                ", ".join(u.sso_issuers) or "-",
                fmt_time(u.created_at),
                fmt_time(u.last_login_at),
            )
            for u in users
        ],
    )


@users_app.command("set-role")
def users_set_role(username: str, role: Role, data_dir: DataDir = None) -> None:
    """Change a user's role."""
    _update_user(username, UserUpdate(role=role), data_dir, f"{username!r} is now {role.value}")


@users_app.command("disable")
def users_disable(username: str, data_dir: DataDir = None) -> None:
    """Disable a user: their sessions end and their keys stop working."""
    _update_user(username, UserUpdate(disabled=True), data_dir, f"{username!r} disabled")


@users_app.command("enable")
def users_enable(username: str, data_dir: DataDir = None) -> None:
    """Enable a disabled user."""
    _update_user(username, UserUpdate(disabled=False), data_dir, f"{username!r} enabled")


@users_app.command("set-password")
def users_set_password(
    username: str,
    password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False,
    data_dir: DataDir = None,
) -> None:
    """Set a user's password (recovery); their sessions end."""
    password = read_secret("New password", from_stdin=password_stdin)
    if password is None:
        fail("give the password on stdin (--password-stdin) or run on a terminal", EXIT_USAGE)
    try:
        update = UserUpdate(password=password)
    except ValidationError as exc:
        fail(validation_message(exc), EXIT_USAGE)
    _update_user(username, update, data_dir, f"password of {username!r} changed")


def _update_user(username: str, update: UserUpdate, data_dir: Path | None, done: str) -> None:
    settings = settings_or_exit(data_dir=data_dir)

    async def go() -> None:
        async with offline_auth(settings) as auth:
            await auth.update_user(username, update, actor="cli")

    run_async(go)
    console.print(done)


# ----- keys ------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option("--user", help="Owner of the key.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "cli",
    expires: Annotated[
        str | None, typer.Option(help="Lifetime: 90d, 12h, 30m (default: never).")
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="Limit the key (repeatable), e.g. inference."),
    ] = None,
    data_dir: DataDir = None,
    json_output: JsonFlag = False,
) -> None:
    """Create an API key; it is printed once and never again."""
    from legator.core.auth.permissions import validate_scopes

    settings = settings_or_exit(data_dir=data_dir)
    expires_at = utcnow() + parse_duration(expires) if expires else None
    try:
        scopes = validate_scopes(scope or ["*"])
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)

    async def go():  # type: ignore[no-untyped-def]
        async with offline_auth(settings) as auth:
            return await auth.create_key(
                user, name=name, scopes=scopes, expires_at=expires_at, actor="cli"
            )

    key, raw = run_async(go)
    if json_output:
        print_json({**key.model_dump(mode="json"), "key": raw})
        return
    err_console.print(f"key {key.prefix}… for {key.username} (shown once, store it now):")
    sys.stdout.write(raw + "\n")


@keys_app.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's keys.")] = None,
    data_dir: DataDir = None,
    json_output: JsonFlag = False,
) -> None:
    """List API keys (never the keys themselves)."""
    settings = settings_or_exit(data_dir=data_dir)

    async def go():  # type: ignore[no-untyped-def]
        async with offline_auth(settings) as auth:
            return await auth.list_keys(user)

    keys = run_async(go)
    if json_output:
        print_json(keys)
        return
    now = utcnow()
    print_table(
        "API keys",
        ["id", "prefix", "user", "name", "scopes", "state", "expires", "last used"],
        [
            (
                k.id,
                k.prefix,
                k.username,
                k.name,
                ",".join(k.scopes),
                "revoked"
                if k.revoked_at
                else ("expired" if k.expires_at and k.expires_at <= now else "active"),
                fmt_time(k.expires_at),
                fmt_time(k.last_used_at),
            )
            for k in keys
        ],
    )


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id or prefix.")], data_dir: DataDir = None
) -> None:
    """Revoke an API key at once."""
    settings = settings_or_exit(data_dir=data_dir)

    async def go():  # type: ignore[no-untyped-def]
        async with offline_auth(settings) as auth:
            return await auth.revoke_key(key, actor="cli")

    revoked = run_async(go)
    console.print(f"key {revoked.prefix}… of {revoked.username} revoked")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
