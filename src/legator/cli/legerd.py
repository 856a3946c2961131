"""`legerd`: its own issue implements it; until then it explains itself and exits 2."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="legerd",
    help="legerd: the setec-compatible encrypted secrets daemon. (not implemented yet)",
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def _root() -> None:
    typer.echo("legerd: not implemented yet", err=True)
    raise typer.Exit(2)


def main() -> None:
    app()
