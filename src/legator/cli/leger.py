"""`leger`: the Deploy wing's CLI. For now it has one command group, ``secrets``."""

from __future__ import annotations

import typer

from legator.cli.leger_secrets import app as secrets_app

app = typer.Typer(
    name="leger",
    help="Leger: deploy Podman quadlets with secrets from legerd.",
    add_completion=False,
    no_args_is_help=True,
)
app.add_typer(secrets_app, name="secrets")


def main() -> None:
    app()
