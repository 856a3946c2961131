"""``legator tokens|probes|run``: the fleet over the control plane's HTTP API."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer

from legator.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    err_console,
    fail,
    print_fields,
    print_json,
    print_listing,
    print_table,
)
from legator.cli.online import (
    DEFAULT_SERVER,
    JsonFlag,
    ServerOpt,
    call,
    check,
    client,
    not_json,
)

tokens_app = typer.Typer(help="Probe enrolment tokens: create, list, delete.", no_args_is_help=True)
probes_app = typer.Typer(help="Probes: list, show, delete.", no_args_is_help=True)


@tokens_app.command("create")
def tokens_create(
    multi_use: Annotated[bool, typer.Option(help="Usable by many probes.")] = False,
    no_expiry: Annotated[bool, typer.Option(help="Never expires (default 30 minutes).")] = False,
    probe: Annotated[
        str | None,
        typer.Option(
            "--probe",
            metavar="PROBE_ID",
            help="Re-enrol this probe (a reinstalled host): the token enrols it again, keeping "
            "its id, policy and history, and nothing else. Single-use; it expires.",
        ),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """Create an enrolment token and print the install command (shown once).

    A token enrols new hostnames only; a host that is already enrolled takes --probe."""
    params: dict[str, Any] = {"multi_use": multi_use, "no_expiry": no_expiry}
    if probe:
        params["probe_id"] = probe
    body = call(server, "POST", "/api/v1/tokens", params=params)
    if json_output:
        print_json(body)
        return
    if body.get("probe_id"):
        err_console.print(f"re-enrols probe {body['probe_id']} (and nothing else)")
    err_console.print(f"token expires: {body['expires_at'] or 'never'}; install with:")
    sys.stdout.write(body["install_command"] + "\n")


@tokens_app.command("list")
def tokens_list(server: ServerOpt = DEFAULT_SERVER, json_output: JsonFlag = False) -> None:
    """List enrolment tokens (never the secret: only its first characters)."""
    print_listing(
        call(server, "GET", "/api/v1/tokens"),
        json_output,
        "enrolment tokens",
        ["id", "prefix", "for probe", "multi-use", "used", "expires", "created by"],
        lambda t: (
            t["id"],
            t["prefix"] + "…",
            t["probe_id"] or "-",
            "yes" if t["multi_use"] else "no",
            t["used_count"],
            t["expires_at"] or "never",
            t["created_by"],
        ),
    )


@tokens_app.command("delete")
def tokens_delete(token_id: str, server: ServerOpt = DEFAULT_SERVER) -> None:
    """Revoke an enrolment token: it enrols nothing more."""
    call(server, "DELETE", f"/api/v1/tokens/{token_id}")
    err_console.print(f"deleted {token_id}")


@probes_app.command("list")
def probes_list(
    status: Annotated[str | None, typer.Option(help="online, degraded or offline.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only probes with this tag.")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """List probes."""
    params = {k: v for k, v in {"status": status, "tag": tag}.items() if v}
    print_listing(
        call(server, "GET", "/api/v1/probes", params=params),
        json_output,
        "probes",
        ["id", "hostname", "status", "connected", "policy", "tags", "last seen"],
        lambda p: (
            p["id"],
            p["hostname"],
            p["status"],
            "yes" if p["connected"] else "no",
            p["policy_id"],
            ",".join(p["tags"]),
            p["last_seen_at"] or "-",
        ),
    )


@probes_app.command("show")
def probes_show(
    probe_id: str,
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """A probe's details, metrics and health."""
    probe = call(server, "GET", f"/api/v1/probes/{probe_id}")
    health = call(server, "GET", f"/api/v1/probes/{probe_id}/health")
    if json_output:
        print_json({**probe, "health": health})
        return
    metrics = probe["metrics"] or {}
    fields = [
        ("id", probe["id"]),
        ("hostname", probe["hostname"]),
        ("status", probe["status"]),
        ("connected", probe["connected"]),
        ("policy", probe["policy_id"]),
        ("max level", probe["max_level"]),
        ("tags", ",".join(probe["tags"])),
        ("version", probe["version"]),
        ("cpu %", metrics.get("cpu_percent")),
        ("memory %", metrics.get("memory_percent")),
        ("disk %", metrics.get("disk_percent")),
        ("health", f"{health['score']} {'; '.join(health['reasons'])}"),
    ]
    print_fields(f"probe {probe_id}", fields)


@probes_app.command("delete")
def probes_delete(probe_id: str, server: ServerOpt = DEFAULT_SERVER) -> None:
    """Delete a probe (its key stops working at once)."""
    call(server, "DELETE", f"/api/v1/probes/{probe_id}")
    err_console.print(f"deleted {probe_id}")


def run(
    argv: Annotated[
        list[str],
        typer.Argument(
            help="PROBE -- COMMAND [ARGS…] (or -- COMMAND with --tag).", show_default=False
        ),
    ],
    tag: Annotated[str | None, typer.Option(help="Run on every probe with this tag.")] = None,
    shell: Annotated[bool, typer.Option(help="Run through /bin/sh -c.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds before the probe kills it.")] = 60.0,
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """Run a command on a probe and stream its output; the exit code is the command's."""
    if tag is None:
        if len(argv) < 2:
            fail("usage: legator run PROBE -- COMMAND [ARGS…]", EXIT_USAGE)
        probe_id, command = argv[0], argv[1:]
    else:
        probe_id, command = "", argv
    body = {
        "command": " ".join(command) if shell else command[0],
        "args": [] if shell else command[1:],
        "shell": shell,
        "timeout_s": timeout,
    }
    if tag is not None:
        result = call(server, "POST", f"/api/v1/fleet/by-tag/{tag}/command", json=body)
        _print_fan_out(result, json_output)
        return
    if json_output:
        result = call(
            server,
            "POST",
            f"/api/v1/probes/{probe_id}/command",
            params={"wait": "true"},
            json=body,
        )
        print_json(result)
        _exit_like(result)
    started = call(
        server,
        "POST",
        f"/api/v1/probes/{probe_id}/command",
        params={"stream": "true"},
        json=body,
    )
    final = _follow(server, started["stream_url"])
    _exit_like(final)


def _follow(server: str, url: str) -> dict[str, Any]:
    """Print a command's output as its event stream delivers it; the final result. The
    server going away mid-stream ends the command with one line (``client``)."""
    final: dict[str, Any] = {}
    with client(server) as http, http.stream("GET", url) as response:
        if response.status_code >= 400:
            response.read()
            check(response)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
            fail(not_json(response, "an event stream"))  # a proxy's page, say
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "result":
                    final = data
                else:
                    target = sys.stderr if event == "stderr" else sys.stdout
                    target.write(data["data"])
                    target.flush()
    return final


def _exit_like(result: dict[str, Any]) -> NoReturn:
    status = result.get("status")
    if status in ("completed", "failed"):
        raise typer.Exit(result.get("exit_code") or 0)
    fail(f"command {status}: {result.get('error') or ''}".strip())


def _print_fan_out(result: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print_json(result)
    else:
        rows = []
        for item in result["results"]:
            out = item.get("result") or {}
            text = (out.get("stdout") or item.get("error") or "").strip().replace("\n", " ⏎ ")
            rows.append(
                [
                    item["hostname"],
                    item["probe_id"],
                    out.get("status", "refused"),
                    out.get("exit_code"),
                    text[:80],
                ]
            )
        print_table(
            f"tag {result['tag']} ({result['targets']} probes)",
            ["hostname", "probe", "status", "exit", "output"],
            rows,
        )
    if not all(item["ok"] for item in result["results"]):
        raise typer.Exit(EXIT_FAILED)
