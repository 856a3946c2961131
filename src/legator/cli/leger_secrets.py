"""`leger secrets …`: setec's commands against legerd (thin: parse, call the client, print)."""

from __future__ import annotations

import getpass
import json
import os
import secrets as pysecrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer

from legator.cli.common import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_USAGE, fail, print_table
from legator.secrets.client import Client
from legator.secrets.errors import InvalidRequest, SecretNotFound, SecretsError, VersionClaimed
from legator.secrets.server import DEFAULT_SOCKET
from legator.secrets.service import validate_name

T = TypeVar("T")

app = typer.Typer(
    name="secrets",
    help=(
        "Secrets in the local legerd (setec API): get, put, list, info, activate, delete, "
        "and sync your deploy secrets from the control plane."
    ),
    no_args_is_help=True,
)


class Target:
    server: str | None = None
    socket: str = str(DEFAULT_SOCKET)


_target = Target()


@app.callback()
def _connection(
    server: str | None = typer.Option(
        None,
        "--server",
        envvar="LEGER_SECRETS_SERVER",
        help="legerd (or any setec server) URL, e.g. http://127.0.0.1:8573.",
    ),
    socket: str = typer.Option(
        str(DEFAULT_SOCKET),
        "--socket",
        envvar="LEGER_SECRETS_SOCKET",
        help="legerd's unix socket, used when --server is not given.",
    ),
) -> None:
    _target.server, _target.socket = server, socket


def _client() -> Client:
    if _target.server:
        return Client(_target.server)
    return Client(socket_path=_target.socket)


def _run(action: Callable[[Client], T]) -> T:
    try:
        with _client() as client:
            return action(client)
    except SecretNotFound as exc:
        fail(exc.message, EXIT_NOT_FOUND)
    except VersionClaimed as exc:
        fail(exc.message, EXIT_CONFLICT)
    except InvalidRequest as exc:
        fail(exc.message, EXIT_USAGE)
    except SecretsError as exc:
        fail(exc.message)


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except InvalidRequest as exc:
        fail(f"{name!r}: {exc.message}", EXIT_USAGE)


def _read_value(from_file: Path | None) -> bytes:
    """The value from --from-file, stdin, or a hidden prompt on a terminal; never argv."""
    if from_file is not None:
        try:
            value = from_file.read_bytes().strip()
        except OSError as exc:
            fail(f"--from-file: {exc}", EXIT_USAGE)
    elif sys.stdin.isatty():
        first = getpass.getpass("Enter secret: ")
        if getpass.getpass("Confirm secret: ") != first:
            fail("secrets do not match, aborting", EXIT_USAGE)
        value = first.encode()
    else:
        value = sys.stdin.buffer.read()
        if value.endswith(b"\n"):
            value = value[:-1]
    if not value:
        fail("no secret provided, aborting", EXIT_USAGE)
    return value


def _confirm(what: str, yes: bool) -> None:
    """setec-style: type back a random token, so a delete is never one slip of the finger."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"refusing to {what} without confirmation: pass --yes", EXIT_USAGE)
    token = pysecrets.token_hex(3)
    typer.echo(f"About to {what}. This cannot be undone.", err=True)
    answer = typer.prompt(f"Type {token} to confirm", err=True)
    if answer.strip() != token:
        fail("confirmation token did not match; nothing deleted")


@app.command("get")
def get(
    name: str,
    version: int = typer.Option(0, "--version", min=0, help="Version (default: the active one)."),
    if_changed: bool = typer.Option(
        False,
        "--if-changed",
        help="Only print the active value if it is not --version (exit 0, "
        "no output, when unchanged).",
    ),
) -> None:
    """Print a secret's value (raw bytes; a newline is added on a terminal)."""
    name = _name(name)
    if if_changed and not version:
        fail("--if-changed needs --version", EXIT_USAGE)
    if if_changed:
        result = _run(lambda c: c.get_if_changed(name, version))
        if result is None:
            return
        value = result[0]
    else:
        value = _run(lambda c: c.get(name, version))[0]
    sys.stdout.buffer.write(value + (b"\n" if sys.stdout.isatty() else b""))
    sys.stdout.flush()


@app.command("put")
def put(
    name: str,
    from_file: Path | None = typer.Option(
        None, "--from-file", help="Read the value from this file (surrounding space trimmed)."
    ),
) -> None:
    """Store a new version (from --from-file, stdin, or a hidden prompt). An unchanged value
    keeps its version; a new one is stored inactive unless it is the first."""
    name = _name(name)
    value = _read_value(from_file)
    version = _run(lambda c: c.put(name, value))
    typer.echo(f"Secret saved as {name!r}, version {version}")


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """The secrets you may see, with their versions."""
    infos = _run(lambda c: c.list())
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {"Name": i.name, "Versions": i.versions, "ActiveVersion": i.active_version}
                    for i in infos
                ],
                indent=2,
            )
        )
        return
    print_table(
        "Secrets",
        ["Name", "Active", "Versions"],
        [(i.name, i.active_version, ",".join(map(str, i.versions))) for i in infos],
    )


@app.command("info")
def info(
    name: str,
    as_json: bool = typer.Option(
        False, "--json", help="Print the name, versions and active version as JSON."
    ),
) -> None:
    """A secret's versions and active version."""
    name = _name(name)
    result = _run(lambda c: c.info(name))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "Name": result.name,
                    "Versions": result.versions,
                    "ActiveVersion": result.active_version,
                }
            )
        )
        return
    typer.echo(f"Name:           {result.name}")
    typer.echo(f"Active version: {result.active_version}")
    typer.echo(f"Versions:       {', '.join(map(str, result.versions))}")


@app.command("activate")
def activate(name: str, version: int = typer.Argument(..., min=1)) -> None:
    """Make VERSION the active version."""
    name = _name(name)
    _run(lambda c: c.activate(name, version))
    typer.echo(f"{name}: version {version} is active")


@app.command("delete")
def delete(
    name: str, yes: bool = typer.Option(False, "--yes", "-y", help="Skip the confirmation.")
) -> None:
    """Delete a secret and every version of it."""
    name = _name(name)
    _confirm(f"delete secret {name!r} and all its versions", yes)
    _run(lambda c: c.delete(name))
    typer.echo(f"{name}: deleted")


@app.command("delete-version")
def delete_version(
    name: str,
    version: int = typer.Argument(..., min=1),
    yes: bool = typer.Option(False, "--yes", "-y", help="Skip the confirmation."),
) -> None:
    """Delete one inactive version (its number is never reused)."""
    name = _name(name)
    _confirm(f"delete version {version} of {name!r}", yes)
    _run(lambda c: c.delete_version(name, version))
    typer.echo(f"{name}: version {version} deleted")


@app.command("sync")
def sync(
    control_plane: str | None = typer.Option(
        None,
        "--control-plane",
        envvar="LEGATOR_URL",
        help="The control plane's URL (default: the one of `leger auth login`).",
    ),
    user: str = typer.Option(
        None, "--user", help="Local namespace leger/<user>/ (default: your login name)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the synced names and versions as JSON."
    ),
) -> None:
    """Copy your deploy secrets (deploy/<you>/<name> on the control plane) into the local
    legerd as leger/<user>/<name>. The control plane and the token are those of
    `leger auth login`; --control-plane ($LEGATOR_URL) and $LEGATOR_API_KEY override them."""
    from legator.secrets.sync import sync_deploy_secrets

    server, key = _sync_credentials(control_plane, os.environ.get("LEGATOR_API_KEY"))
    local_user = user or getpass.getuser()
    try:
        with Client(server, api_key=key, prefix="/api/v1/secrets") as remote:
            copied = _run(lambda local: sync_deploy_secrets(remote, local, local_user))
    except SecretsError as exc:
        fail(exc.message)
    if as_json:
        typer.echo(json.dumps([{"Name": n, "Version": v} for n, v in copied]))
        return
    for name, version in copied:
        typer.echo(f"{name}: version {version}")
    typer.echo(f"{len(copied)} secret(s) synced")


def _sync_credentials(control_plane: str | None, env_key: str | None) -> tuple[str, str]:
    """The control plane and API key for ``sync``: the stored login's, unless overridden. The
    stored token only ever goes to the server it was issued by."""
    from legator.deploy.client import ControlPlaneError, require_login
    from legator.deploy.layout import layout

    override = control_plane.rstrip("/") if control_plane else None
    if override and env_key:
        return override, env_key
    try:
        login = require_login(layout(False).auth_file)
    except ControlPlaneError as exc:
        fail(f"{exc}, or give --control-plane URL with LEGATOR_API_KEY set", EXIT_USAGE)
    server = override or login.server
    if env_key:
        return server, env_key
    if login.server.rstrip("/") != server:
        fail(
            f"logged in to {login.server}, not {server}: set LEGATOR_API_KEY to an API key "
            "of that control plane",
            EXIT_USAGE,
        )
    return server, login.token


@app.command()
def fetch(
    service: str = typer.Argument(..., help="The container (quadlet name) to fetch for."),
    system: bool = typer.Option(False, "--system", help="A system-scope deployment."),
) -> None:
    """Write the secrets SERVICE's quadlet asks for (``Secret=…,type=env``) to
    ``$XDG_RUNTIME_DIR/SERVICE.env`` (0600), for units that read an ``EnvironmentFile=``.
    Values come from legerd first, as at install."""
    from legator.cli.leger_common import deployer, guard
    from legator.deploy.envfile import EnvFileError, fetch_env

    runner = deployer(system)
    try:
        path, variables = guard(lambda: fetch_env(runner.layout.quadlets, service, runner.secrets))
    except EnvFileError as exc:
        fail(str(exc), EXIT_NOT_FOUND if str(exc).startswith("no container") else 1)
    typer.echo(f"wrote {path} ({', '.join(variables)})")
