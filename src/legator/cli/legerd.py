"""`legerd`: the setec-compatible encrypted secrets daemon (thin: parse flags, call
``legator.secrets.server``)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import typer

from legator.cli.common import EXIT_NOT_FOUND, EXIT_USAGE, fail, one_line
from legator.core.logging import configure_logging
from legator.secrets.acl import AclError
from legator.secrets.crypto import Kek, generate_key, load_kek, load_key_file, write_key_file
from legator.secrets.errors import NotAStore, SecretsError
from legator.secrets.pgstore import recount_pg_usage
from legator.secrets.quota import ENV_PREFIX, Quota, UsageChange
from legator.secrets.ratelimit import BURST_ENV, RATE_ENV, RateLimit
from legator.secrets.server import (
    DEFAULT_ACL,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_TAILSCALE_SOCKET,
    ConfigProblem,
    LegerdConfig,
    rotation_lock,
    serve,
)
from legator.secrets.store import SecretStore, recount_sqlite_usage

app = typer.Typer(
    name="legerd",
    help=(
        "legerd: the setec-compatible encrypted secrets daemon. Callers are identified by "
        "Tailscale (TCP) or by their uid (unix socket); an ACL decides what each may do."
    ),
    add_completion=False,
    no_args_is_help=True,
)

StateDir = typer.Option(
    DEFAULT_STATE_DIR, "--state-dir", envvar="LEGERD_STATE_DIR", help="Database, key, audit log."
)

# Each limit flag and the environment variable it overrides.
LIMIT_FLAGS = {
    "--max-versions-per-secret": ENV_PREFIX + "MAX_VERSIONS_PER_SECRET",
    "--max-secrets-per-writer": ENV_PREFIX + "MAX_SECRETS_PER_WRITER",
    "--max-bytes-per-writer": ENV_PREFIX + "MAX_BYTES_PER_WRITER",
    "--max-total-bytes": ENV_PREFIX + "MAX_TOTAL_BYTES",
    "--rate-limit": RATE_ENV,
    "--rate-burst": BURST_ENV,
}


def _limit(flag: str, default: str, *, minimum: int = 0) -> Any:
    """A limit flag: unset, its variable (or the default) decides."""
    return typer.Option(
        None,
        flag,
        min=minimum,
        show_default=False,
        help=f"Overrides ${LIMIT_FLAGS[flag]}; default {default}.",
    )


def limits_from_flags(
    given: dict[str, float | None], *, dev: bool
) -> tuple[Quota | None, RateLimit | None]:
    """The quotas and rate limit with the flags given laid over the environment; (None,
    None) when none was given (the server reads the environment itself)."""
    overrides = {LIMIT_FLAGS[flag]: str(v) for flag, v in given.items() if v is not None}
    if not overrides:
        return None, None
    env = {**os.environ, **overrides}
    try:
        return Quota.from_env(env), RateLimit.from_env(env, dev=dev)
    except ValueError as exc:
        message = str(exc)
        for flag, name in LIMIT_FLAGS.items():
            if name in overrides:  # the bad value is the flag's, not the variable's
                message = message.replace(name, flag)
        fail(message, EXIT_USAGE)


@app.command("serve")
def serve_command(
    state_dir: Path = StateDir,
    listen: str | None = typer.Option(
        None,
        "--listen",
        envvar="LEGERD_LISTEN",
        help="TCP HOST:PORT for Tailscale callers (e.g. your tailnet IP:8573). Off by default.",
    ),
    socket_path: str = typer.Option(
        str(DEFAULT_SOCKET),
        "--socket",
        envvar="LEGERD_SOCKET",
        help="Unix socket for local callers (identified by uid); '' to disable.",
    ),
    dev: bool = typer.Option(
        False, "--dev", help="Development: loopback only, every local caller may do anything."
    ),
    acl: Path | None = typer.Option(
        None,
        "--acl",
        envvar="LEGERD_ACL",
        help=f"Local policy file (default: {DEFAULT_ACL} when it exists).",
    ),
    tailscale_socket: Path = typer.Option(
        DEFAULT_TAILSCALE_SOCKET,
        "--tailscale-socket",
        envvar="LEGERD_TAILSCALE_SOCKET",
        help="tailscaled's LocalAPI socket, asked who each TCP caller is.",
    ),
    allowed_hosts: str = typer.Option(
        "",
        "--allowed-hosts",
        envvar="LEGERD_ALLOWED_HOSTS",
        help="Comma-separated host names TCP callers may use besides IP literals and "
        "localhost (e.g. legerd.example.ts.net); empty: any. Defeats DNS rebinding.",
    ),
    log_level: str = typer.Option(
        "warning", "--log-level", help="debug, info, warning or error.", envvar="LEGERD_LOG_LEVEL"
    ),
    max_versions_per_secret: int | None = _limit("--max-versions-per-secret", "1000"),
    max_secrets_per_writer: int | None = _limit("--max-secrets-per-writer", "10000"),
    max_bytes_per_writer: int | None = _limit("--max-bytes-per-writer", "256 MiB"),
    max_total_bytes: int | None = _limit("--max-total-bytes", "2 GiB"),
    rate_limit: float | None = _limit("--rate-limit", "50 a second per source; none with --dev"),
    rate_burst: int | None = _limit("--rate-burst", "1000", minimum=1),
) -> None:
    """Serve the setec API on --listen and/or --socket.

    Limits (0 turns one off) come from the --max-* and --rate-* flags, else from the \
environment variables they name: versions kept per secret, secrets and bytes per writer, \
bytes in all, and calls a second per source after a burst. \
The audit log is rotated at LEGERD_AUDIT_MAX_BYTES (100 MiB; 0: never, for an external \
logrotate), keeping LEGERD_AUDIT_KEEP files (10); SIGHUP reloads the policy and reopens \
audit.log. See docs/secrets.md."""
    if log_level not in ("debug", "info", "warning", "error"):
        fail(f"--log-level {log_level!r}: expected debug, info, warning or error", EXIT_USAGE)
    quota, limit = limits_from_flags(
        {
            "--max-versions-per-secret": max_versions_per_secret,
            "--max-secrets-per-writer": max_secrets_per_writer,
            "--max-bytes-per-writer": max_bytes_per_writer,
            "--max-total-bytes": max_total_bytes,
            "--rate-limit": rate_limit,
            "--rate-burst": rate_burst,
        },
        dev=dev,
    )
    configure_logging(log_level, "auto")
    if acl is None and DEFAULT_ACL.exists():
        acl = DEFAULT_ACL
    config = LegerdConfig(
        state_dir=state_dir,
        listen=listen,
        socket_path=Path(socket_path) if socket_path else None,
        dev=dev,
        acl_path=acl,
        tailscale_socket=tailscale_socket,
        allowed_hosts=tuple(name.strip() for name in allowed_hosts.split(",") if name.strip()),
        quota=quota,
        rate_limit=limit,
    )
    try:
        serve(config, log_level=log_level)
    except (ConfigProblem, AclError) as exc:
        fail(str(exc), EXIT_USAGE)
    except SecretsError as exc:
        fail(exc.message)
    except OSError as exc:
        fail(f"cannot serve: {exc}")


@app.command("rotate-kek")
def rotate_kek(
    state_dir: Path = StateDir,
    new_key_file: Path | None = typer.Option(
        None,
        "--new-key-file",
        help="Read the new key (64 hex) from this file (0600: one others can read is "
        "refused) instead of generating one. When the current key is <state-dir>/keys/"
        "main.key, the new key replaces it there; when it comes from $LEGERD_KEK or a "
        "systemd credential, install the new key there yourself.",
    ),
) -> None:
    """Re-wrap the data key under a new key-encryption key (values are not re-encrypted).

    Safe to interrupt: the store opens with the old or the new key at every step.
    """
    config = LegerdConfig(state_dir=state_dir)
    if not config.db_path.exists():
        fail(f"no store at {config.db_path}", 3)
    if new_key_file is not None and not new_key_file.is_file():
        fail(f"--new-key-file {new_key_file}: no such file", EXIT_USAGE)
    try:
        with rotation_lock(config):
            old = load_kek(config.key_file, create=False)
            # Where `legerd serve` will look for the key: replaced here, or by the operator.
            in_key_file = old.source == str(config.key_file)
            if new_key_file is None and not in_key_file:
                fail(
                    f"the current key comes from {old.source}; give --new-key-file and "
                    "install that key there yourself"
                )
            if new_key_file is not None:
                new = load_key_file(new_key_file, create=False)  # refuses one others can read
            else:
                new = Kek(generate_key(), str(config.key_file))
            if new.key_id == old.key_id:
                fail("the new key is the same as the current one")
            store = SecretStore(config.db_path, old)
            try:
                # Each step commits before the next, and the store opens with the key file as
                # it is after any of them: (1) the data key is wrapped under both keys; (2) the
                # key file is replaced atomically (a new 0600 file renamed over it); (3) only
                # then is the old key's wrapping dropped.
                store.add_kek(new, old)
                if in_key_file:
                    write_key_file(config.key_file, new.key)
                store.drop_other_keks(new)
            finally:
                store.close()
            checked = SecretStore(config.db_path, new).verify_all()
    except SecretsError as exc:
        fail(exc.message)
    except OSError as exc:
        fail(str(exc))
    if in_key_file:
        where = str(config.key_file)
        if new_key_file is not None:
            where += f", copied from {new_key_file}"
    else:
        where = f"{new_key_file}; install it in {old.source} before restarting legerd"
    typer.echo(
        f"data key re-wrapped under key {new.key_id} ({where}); {checked} stored value(s) verified"
    )


@app.command("recount")
def recount(
    state_dir: Path = StateDir,
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="Recount the control plane's store in this PostgreSQL database (its "
        "LEGATOR_DATABASE_URL) instead of the SQLite store in --state-dir.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what changed as JSON."),
) -> None:
    """Recount the per-writer usage totals (used by the quotas) from the stored rows.

    The totals are counters kept with every write; a writer that does not keep them (a
    replica from before quotas, writing beside a newer one) or rows changed by hand make
    them drift. One transaction, as a writer: legerd or the replicas may keep serving, their
    writes wait for it. Needs no key. Prints each writer whose totals changed.
    """
    try:
        if database_url is None:
            where = str(state_dir / "secrets.db")
            changes = recount_sqlite_usage(state_dir / "secrets.db")
        elif database_url.startswith("sqlite"):
            fail("--database-url: for a SQLite store give --state-dir <its directory>", EXIT_USAGE)
        else:
            where = "the PostgreSQL database"
            changes = recount_pg_usage(database_url)
    except NotAStore as exc:
        fail(exc.message, EXIT_NOT_FOUND)
    except (sqlite3.Error, psycopg.Error) as exc:
        fail(f"database: {one_line(exc)}")
    except ValueError as exc:  # an unreadable URL
        fail(f"--database-url: {one_line(exc)}", EXIT_USAGE)
    if as_json:
        typer.echo(json.dumps({"store": where, "changed": [c.as_json() for c in changes]}))
        return
    typer.echo(_recount_summary(where, changes))


def _recount_summary(where: str, changes: list[UsageChange]) -> str:
    if not changes:
        return f"usage totals in {where} match its rows: nothing changed"
    lines = [f"usage totals in {where} recounted; {len(changes)} writer(s) changed:"]
    for change in changes:
        writer = change.writer or "(no writer: stored before quotas, or imported)"
        lines.append(
            f"  {writer}: bytes {change.bytes_before} -> {change.bytes_after}, "
            f"secrets {change.secrets_before} -> {change.secrets_after}"
        )
    return "\n".join(lines)


def main() -> None:
    app()
