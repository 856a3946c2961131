"""`legator models …` and `legator backends …`: the gateway's own models (online)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from legator.cli.common import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    console,
    fail,
    print_fields,
    print_json,
    print_listing,
)
from legator.cli.online import (
    DEFAULT_SERVER,
    JsonFlag,
    ServerOpt,
    call,
    check,
    client,
    error_message,
    not_json,
)

models_app = typer.Typer(help="Pull, list, show and remove gateway models.", no_args_is_help=True)
backends_app = typer.Typer(
    help="Start, stop and read the logs of managed llama.cpp backends.", no_args_is_help=True
)
POLL_S = 0.5
GIB = 1024**3


@models_app.command("pull")
def pull(
    repo: Annotated[str, typer.Argument(help="Hub repository, owner/name.")],
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="GGUF file (default: the repo's only one).")
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--id", help="Model id to register (default: from the file).")
    ] = None,
    runtime: Annotated[
        str, typer.Option("--runtime", help="process or podman: how it will be served.")
    ] = "process",
    revision: Annotated[str, typer.Option(help="Branch, tag or commit.")] = "main",
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Start the download and return.")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Download a GGUF from the hub (HF_ENDPOINT on the server) and register it as a model.
    The download runs on the server: interrupting this command does not stop it."""
    body: dict[str, Any] = {"repo": repo, "revision": revision, "backend_kind": runtime}
    if file:
        body["file"] = file
    if model_id:
        body["model_id"] = model_id
    download = call(server, "POST", "/api/v1/gateway/downloads", json=body)
    if download.get("warning"):
        console.print(f"[yellow]warning:[/yellow] {download['warning']}")
    if detach:
        console.print(f"download {download['id']} started")
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(download["filename"], total=download["total_bytes"] or None)
        while download["state"] in ("queued", "running"):
            time.sleep(POLL_S)
            download = call(server, "GET", f"/api/v1/gateway/downloads/{download['id']}")
            progress.update(task, completed=download["done_bytes"])
    if download["state"] != "completed":
        fail(f"download {download['state']}: {download['error']}", EXIT_FAILED)
    console.print(f"model [bold]{download['model_id']}[/bold] registered")


@models_app.command("list")
def list_models(server: ServerOpt = DEFAULT_SERVER, json_output: JsonFlag = False) -> None:
    """Every model with its backend kind and state."""
    print_listing(
        call(server, "GET", "/api/v1/gateway/models"),
        json_output,
        "Models",
        ["id", "kind", "state", "context", "parallel", "source", "size (GiB)"],
        lambda m: (
            m["id"],
            m["backend_kind"],
            m["state"],
            m["context_length"],
            m["parallel"],
            m["source_repo"] or m.get("backend_url", ""),  # the URL: admins only
            f"{m['gguf']['file_size'] / GIB:.2f}" if m.get("gguf") else "",
        ),
    )


@models_app.command("show")
def show_model(
    model_id: str,
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """One model, its GGUF metadata and its memory estimate."""
    model = call(server, "GET", f"/api/v1/gateway/models/{model_id}")
    estimate = None
    if model.get("gguf"):
        estimate = call(server, "POST", "/api/v1/gateway/estimate", json={"model_id": model_id})
    if json_output:
        print_json({"model": model, "estimate": estimate})
        return
    fields = [(k, v) for k, v in model.items() if k != "gguf"]
    fields += [(f"gguf.{k}", v) for k, v in (model.get("gguf") or {}).items() if v is not None]
    if estimate:
        fields += [(f"estimate.{k}", v) for k, v in estimate.items() if k != "model_id"]
    print_fields(f"Model {model_id}", fields)


@models_app.command("rm")
def remove_model(
    model_id: str,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Also revoke the API keys pinned to this model (else refused, exit 4)."
        ),
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Delete a model (its backend is stopped first). Refused while API keys are pinned to
    it, unless --force: then those keys are revoked with it."""
    params = {"force": "true"} if force else {}
    with client(server) as http:
        response = http.delete(f"/api/v1/gateway/models/{model_id}", params=params)
    if response.status_code == 409:
        # The server's hint speaks HTTP ("delete with force=true"); say it as this command.
        message = error_message(response)
        hint = f"legator models rm {model_id} --force"
        if "force=true" in message:
            message = message.replace("delete with force=true", f"delete with `{hint}`")
        else:
            message += f" (`{hint}` revokes them with the model)"
        fail(f"{message} (HTTP 409)", EXIT_CONFLICT)
    check(response)
    console.print(f"model {model_id} deleted")


@backends_app.command("start")
def start_backend(
    model_id: str,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return without waiting for health.")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """Launch a model's managed backend and wait until it answers its health check."""
    with console.status(f"starting {model_id}…", spinner="dots"):
        status = call(
            server,
            "POST",
            f"/api/v1/gateway/backends/{model_id}/start",
            params={"wait": str(not detach).lower()},
        )
    if json_output:
        print_json(status)
    if status["state"] == "failed":
        fail(f"{model_id} failed: {status['error']} (see: legator backends logs {model_id})")
    if not json_output:
        console.print(f"{model_id}: {status['state']} on 127.0.0.1:{status['port']}")


@backends_app.command("stop")
def stop_backend(model_id: str, server: ServerOpt = DEFAULT_SERVER) -> None:
    """Stop a model's managed backend."""
    status = call(server, "POST", f"/api/v1/gateway/backends/{model_id}/stop")
    console.print(f"{model_id}: {status['state']}")


@backends_app.command("logs")
def backend_logs(
    model_id: str,
    tail: Annotated[int, typer.Option("--tail", "-n", help="Lines to show.")] = 200,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """The last lines a managed backend wrote."""
    with client(server) as http:
        response = http.get(f"/api/v1/gateway/backends/{model_id}/logs", params={"tail": tail})
    if response.status_code >= 400:
        check(response)
    if response.is_redirect or response.headers.get("content-type", "").startswith("text/html"):
        fail(not_json(response, "the backend's log"))  # a sign-in page, say
    typer.echo(response.text)


@backends_app.command("list")
def list_backends(server: ServerOpt = DEFAULT_SERVER, json_output: JsonFlag = False) -> None:
    """Each model's backend, state, slots and queue."""
    print_listing(
        call(server, "GET", "/api/v1/gateway/backends"),
        json_output,
        "Backends",
        ["model", "kind", "state", "slots", "in use", "queued", "error"],
        lambda r: (
            r["model"],
            r["kind"],
            r["state"],
            r["slots"],
            r["in_use"],
            r["queue_depth"],
            r["error"],
        ),
    )
