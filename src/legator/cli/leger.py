"""`leger`: its own issue implements it; until then it explains itself and exits 2."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="leger",
    help="Leger: deploy Podman quadlets with secrets from legerd. (not implemented yet)",
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def _root() -> None:
    typer.echo("leger: not implemented yet", err=True)
    raise typer.Exit(2)


def main() -> None:
    app()
