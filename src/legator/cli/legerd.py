"""`legerd`: the setec-compatible encrypted secrets daemon (thin: parse flags, call
``legator.secrets.server``)."""

from __future__ import annotations

from pathlib import Path

import typer

from legator.cli.common import EXIT_USAGE, fail
from legator.core.logging import configure_logging
from legator.secrets.acl import AclError
from legator.secrets.crypto import Kek, generate_key, load_kek, load_key_file, write_key_file
from legator.secrets.errors import SecretsError
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
from legator.secrets.store import SecretStore

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
) -> None:
    """Serve the setec API on --listen and/or --socket.

    Limits come from the environment (0 turns one off): \
LEGERD_MAX_VERSIONS_PER_SECRET (1000), LEGERD_MAX_SECRETS_PER_WRITER (10000), \
LEGERD_MAX_BYTES_PER_WRITER (256 MiB), LEGERD_MAX_TOTAL_BYTES (2 GiB), LEGERD_RATE_LIMIT \
calls a second per source (50, after a burst of LEGERD_RATE_BURST, 1000; none with --dev). \
The audit log is rotated at LEGERD_AUDIT_MAX_BYTES (100 MiB; 0: never, for an external \
logrotate), keeping LEGERD_AUDIT_KEEP files (10); SIGHUP reloads the policy and reopens \
audit.log. See docs/secrets.md."""
    if log_level not in ("debug", "info", "warning", "error"):
        fail(f"--log-level {log_level!r}: expected debug, info, warning or error", EXIT_USAGE)
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


def main() -> None:
    app()
