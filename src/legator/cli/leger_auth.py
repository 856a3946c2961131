"""``leger auth``: log in to the control plane, log out, show the login."""

from __future__ import annotations

import os
import socket
import sys

import typer

from legator.cli.common import console, err_console, fail, print_json
from legator.cli.leger_common import JSON_OPTION, guard, scope
from legator.deploy.client import (
    load_login,
    login_with_device,
    login_with_key,
    login_with_tailscale,
    save_login,
)

app = typer.Typer(help="Log in to the Legator control plane.", no_args_is_help=True)


@app.command()
def login(
    server: str = typer.Option(..., "--server", help="Control plane URL, e.g. https://legator.lan"),
    api_key_stdin: bool = typer.Option(
        False, "--api-key-stdin", help="Read an API key from stdin instead of $LEGER_API_KEY."
    ),
    device: bool = typer.Option(
        False, "--device", help="Use the device-code flow even when an API key is available."
    ),
) -> None:
    """Log in by this host's Tailscale identity when the control plane sees the request come
    over the tailnet; else with an API key ($LEGER_API_KEY or --api-key-stdin); else with a
    device code that a signed-in user approves in the control plane. The token is checked
    against the server and stored 0600 in ~/.config/leger/auth.json with its expiry."""
    if not server.startswith(("http://", "https://")):
        fail("--server must be an http:// or https:// URL", 2)
    key = None
    if not device:
        key = sys.stdin.readline().strip() if api_key_stdin else os.environ.get("LEGER_API_KEY")
        if api_key_stdin and not key:
            fail("--api-key-stdin: nothing on stdin", 2)
    via_tailnet = (
        None
        if device or api_key_stdin
        else guard(lambda: login_with_tailscale(server, socket.gethostname()))
    )
    if via_tailnet is not None:
        result = via_tailnet
    elif key:
        result = guard(lambda: login_with_key(server, key))
    else:

        def show(user_code: str, expires_in: int) -> None:
            err_console.print(
                f"Approve this device in the control plane within {expires_in // 60} minutes:\n"
                f"  code [bold]{user_code}[/bold]\n"
                f"  POST {server.rstrip('/')}/api/v1/deploy/device/approve "
                f'{{"user_code": "{user_code}"}}'
            )

        result = guard(lambda: login_with_device(server, socket.gethostname(), show))
    save_login(scope(False).auth_file, result)
    expiry = result.expires_at or "never"
    console.print(
        f"logged in to {result.server} as [bold]{result.username}[/bold] via {result.method} "
        f"(expires {expiry})"
    )


@app.command()
def logout() -> None:
    """Forget the stored login."""
    path = scope(False).auth_file
    existed = path.exists()
    path.unlink(missing_ok=True)
    console.print("logged out" if existed else "was not logged in")


@app.command()
def status(as_json: bool = JSON_OPTION) -> None:
    """Show the server, user, method and expiry of the stored login (exit 1 if none or expired)."""
    current = guard(lambda: load_login(scope(False).auth_file))
    if as_json:
        print_json(current.public() if current else {"logged_in": False})
    elif current is None:
        console.print("not logged in")
    else:
        state = "[red]expired[/red]" if current.expired else "[green]valid[/green]"
        console.print(
            f"{current.server} as {current.username} via {current.method}; "
            f"expires {current.expires_at or 'never'} ({state})"
        )
    if current is None or current.expired:
        raise typer.Exit(1)
