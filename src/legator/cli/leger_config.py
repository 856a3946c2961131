"""``leger config``: fetch and show your saved configuration from the control plane."""

from __future__ import annotations

import json

import typer
from pydantic import ValidationError

from legator.cli.common import console, fail, print_json
from legator.cli.leger_common import EXIT_FAILED, EXIT_USAGE, guard, scope
from legator.core.security import write_private_file
from legator.deploy.client import ControlPlane, require_login
from legator.deploy.schemas import ConfigOut

app = typer.Typer(help="Your deployment configuration on the control plane.", no_args_is_help=True)


@app.command()
def pull(
    version: str = typer.Option("latest", "--version", help="A version number or latest."),
) -> None:
    """Download a configuration version and keep it as the local copy (config.json)."""
    if version != "latest" and not (version.isdigit() and len(version) < 10 and int(version)):
        fail(f"--version {version!r}: expected a version number (1, 2, …) or latest", EXIT_USAGE)
    where = scope(False)

    def fetch() -> object:
        login = require_login(where.auth_file)
        with ControlPlane(login) as api:
            return api.get_json(f"/api/v1/deploy/configs/{version}")

    answer = guard(fetch)
    try:
        config = ConfigOut.model_validate(answer)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where_in = ".".join(str(part) for part in problem["loc"]) or "the answer"
        fail(
            f"the control plane's answer is not a configuration ({where_in}: {problem['msg']}); "
            "config.json was left as it was",
            EXIT_FAILED,
        )
    where.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_file(where.state / "config.json", config.model_dump_json(indent=2))
    console.print(f"pulled version {config.version}: services {', '.join(config.services)}")


@app.command()
def show(as_json: bool = typer.Option(False, "--json", help="Print the raw JSON.")) -> None:
    """Show the configuration pulled last."""
    path = scope(False).state / "config.json"
    if not path.exists():
        fail("no configuration pulled yet: run `leger config pull`", 3)
    config = json.loads(path.read_text())
    if as_json:
        print_json(config)
        return
    console.print(
        f"version {config['version']} saved {config['created_at']} by {config['created_by']}"
    )
    console.print(f"services: {', '.join(config['services'])}")
    console.print(f"secrets required: {', '.join(config['secrets_required']) or '-'}")
    console.print_json(json.dumps(config["spec"]))
