"""``leger auth``: log in to the control plane, log out, show the login."""

from __future__ import annotations

import os

import typer

from legator.cli.common import console, fail, print_json, read_secret
from legator.cli.leger_common import JSON_OPTION, guard, scope
from legator.deploy.client import load_login, login_with_key, save_login

app = typer.Typer(help="Log in to the Legator control plane.", no_args_is_help=True)


@app.command()
def login(
    server: str = typer.Option(..., "--server", help="Control plane URL, e.g. https://legator.lan"),
    api_key_stdin: bool = typer.Option(
        False,
        "--api-key-stdin",
        help="Read the API key from stdin (else $LEGER_API_KEY or a prompt).",
    ),
) -> None:
    """Log in with an API key; it is checked against the server and stored 0600 in
    ~/.config/leger/auth.json with its expiry."""
    if not server.startswith(("http://", "https://")):
        fail("--server must be an http:// or https:// URL", 2)
    key = os.environ.get("LEGER_API_KEY") if not api_key_stdin else None
    key = key or read_secret("API key", from_stdin=api_key_stdin, confirm=False)
    if not key:
        fail("no API key given: pipe it with --api-key-stdin or set LEGER_API_KEY", 2)
    result = guard(lambda: login_with_key(server, key))
    save_login(scope(False).auth_file, result)
    expiry = result.expires_at or "never"
    console.print(
        f"logged in to {result.server} as [bold]{result.username}[/bold] (expires {expiry})"
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
