"""``legator-probe``: enrol this host, run the agent, show its state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from legator.fleet.protocol import LEVELS
from legator.probe.config import CONFIG_NAME, ConfigProblem, default_config_dir, load
from legator.probe.enrol import EnrolError, init

app = typer.Typer(
    name="legator-probe",
    help="The Legator probe: enrol this host with a control plane and run the agent.",
    no_args_is_help=True,
    add_completion=False,
)
EXIT_FAILED, EXIT_USAGE = 1, 2

ConfigDir = Annotated[
    Path | None,
    typer.Option(
        "--config-dir",
        help="Where probe.yaml lives (default /etc/legator as root, else ~/.config/legator).",
        show_default=False,
    ),
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="Path of probe.yaml.", show_default=False)
]


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _config_path(config: Path | None, config_dir: Path | None) -> Path:
    if config is not None:
        return config
    return (config_dir or default_config_dir()) / CONFIG_NAME


def _tags(raw: str | None) -> list[str]:
    return [tag.strip() for tag in (raw or "").split(",") if tag.strip()]


def _check_level(value: str) -> str:
    if value not in LEVELS:
        raise typer.BadParameter(f"expected one of {', '.join(LEVELS)}")
    return value


@app.command("init")
def init_cmd(
    server: Annotated[str, typer.Option(help="Control plane URL, e.g. https://legator.example.")],
    token: Annotated[
        str,
        typer.Option(
            help="Enrolment token (prb_…) from `legator tokens create`.", envvar="LEGATOR_TOKEN"
        ),
    ],
    tags: Annotated[str | None, typer.Option(help="Comma-separated tags.")] = None,
    hostname: Annotated[
        str | None, typer.Option(help="Name to register (default: this host's).")
    ] = None,
    max_level: Annotated[
        str,
        typer.Option(
            help="Local ceiling: observe, diagnose or remediate. The control "
            "plane can lower it, never raise it.",
            callback=_check_level,
        ),
    ] = "diagnose",
    allow_updates: Annotated[
        bool | None,
        typer.Option(
            "--allow-updates/--no-allow-updates",
            help="Whether the control plane may replace this probe's code (self-update). "
            "Default: only with --max-level remediate.",
        ),
    ] = None,
    config_dir: ConfigDir = None,
) -> None:
    """Register this host with a token and write probe.yaml (mode 0600)."""
    path = _config_path(None, config_dir)
    try:
        config = init(
            server,
            token,
            path,
            tags=_tags(tags),
            hostname=hostname,
            max_level=max_level,  # type: ignore[arg-type]
            allow_updates=allow_updates,
        )
    except EnrolError as exc:
        _fail(str(exc))
        return
    typer.echo(f"registered as {config.probe_id}; configuration written to {path}")


@app.command()
def run(config: ConfigFile = None, config_dir: ConfigDir = None) -> None:
    """Run the agent (what the systemd unit starts). Without a probe.yaml it enrols first
    from LEGATOR_SERVER_URL, LEGATOR_TOKEN, LEGATOR_TAGS and LEGATOR_HOSTNAME."""
    from legator.probe.agent import Agent

    path = _config_path(config, config_dir)
    if (
        not path.exists()
        and os.environ.get("LEGATOR_SERVER_URL")
        and os.environ.get("LEGATOR_TOKEN")
    ):
        try:
            init(
                os.environ["LEGATOR_SERVER_URL"],
                os.environ["LEGATOR_TOKEN"],
                path,
                tags=_tags(os.environ.get("LEGATOR_TAGS")),
                hostname=os.environ.get("LEGATOR_HOSTNAME"),
                max_level=os.environ.get("LEGATOR_MAX_LEVEL", "diagnose"),  # type: ignore[arg-type]
            )
        except (EnrolError, ValueError) as exc:
            _fail(f"auto-enrolment failed: {exc}")
    # Spent once enrolled (or never needed): out of this process's environment, so nothing
    # the probe starts from here on (commands, a self-update's re-exec) inherits it.
    os.environ.pop("LEGATOR_TOKEN", None)
    try:
        loaded = load(path)
    except ConfigProblem as exc:
        _fail(str(exc), EXIT_USAGE)
        return
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Agent(loaded, path).run_forever())


@app.command()
def status(
    config: ConfigFile = None,
    config_dir: ConfigDir = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show this probe's identity and whether its control plane answers (no secrets)."""
    import urllib.request

    path = _config_path(config, config_dir)
    try:
        loaded = load(path)
    except ConfigProblem as exc:
        _fail(str(exc), EXIT_USAGE)
        return
    try:
        with urllib.request.urlopen(loaded.server + "/healthz", timeout=5) as response:  # noqa: S310
            reachable = response.status == 200
    except OSError:
        reachable = False
    info = {
        "probe_id": loaded.probe_id,
        "server": loaded.server,
        "server_reachable": reachable,
        "max_level": loaded.policy_level,
        "updates_allowed": loaded.updates_allowed(),
        "tags": loaded.tags,
        "config": str(path),
    }
    if json_output:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        for key, value in info.items():
            typer.echo(f"{key:17} {value}")
    if not reachable:
        raise typer.Exit(EXIT_FAILED)


def main() -> None:
    app()
