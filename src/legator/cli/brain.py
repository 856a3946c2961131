"""``legator chat PROBE`` (interactive, streaming over ``/ws/chat``) and ``legator task``."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import connect

from legator.cli.common import EXIT_FAILED, fail, print_json
from legator.cli.online import DEFAULT_SERVER, JsonFlag, ServerOpt, api_key, check, client

console = Console(highlight=False)
ProbeArg = Annotated[str, typer.Argument(help="Probe id (prb-…).")]


def _print_tools(step: dict[str, Any]) -> None:
    for tool in step.get("tools", []):
        line = f"  [dim]→ {tool['name']}[/dim]"
        if "command" in tool:
            line += f" [bold]{tool['command']}[/bold] ({tool.get('decision', '?')})"
        if "approval" in tool:
            line += f" approval {tool['approval']['id']}: {tool['approval'].get('status')}"
        if "result" in tool:
            line += f" → {tool['result']['status']} exit {tool['result']['exit_code']}"
        if "error" in tool:
            line += f" [red]{tool['error']}[/red]"
        console.print(line)


def task(
    probe: ProbeArg,
    goal: Annotated[str, typer.Argument(help="What to achieve, in plain words.")],
    max_steps: Annotated[int | None, typer.Option(help="Most model turns.")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="Wall-clock limit.")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    as_json: JsonFlag = False,
) -> None:
    """Run an agent task on a probe and print its transcript. Commands that need approval
    hold the task until someone decides (`legator approvals list`). Exit 1 unless the task
    completed."""
    body: dict[str, Any] = {"goal": goal}
    if max_steps is not None:
        body["max_steps"] = max_steps
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    with client(server) as http:
        transcript = check(http.post(f"/api/v1/probes/{probe}/task", json=body))
    if as_json:
        print_json(transcript)
    else:
        for step in transcript["steps"]:
            if step["text"]:
                console.print(f"[cyan]step {step['step']}[/cyan] {step['text']}")
            else:
                console.print(f"[cyan]step {step['step']}[/cyan]")
            _print_tools(step)
        if transcript["answer"]:
            console.print(f"\n{transcript['answer']}")
        if transcript["error"]:
            console.print(f"[red]{transcript['status']}: {transcript['error']}[/red]")
    if transcript["status"] != "completed":
        raise typer.Exit(EXIT_FAILED)


def chat(
    probe: ProbeArg,
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="Send one message and exit.")
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Chat with a probe: the answer streams as the model writes it, commands and approvals
    show as they happen. One session per run; an empty line or Ctrl-D ends it."""
    headers = {"Authorization": f"Bearer {api_key()}"}
    url = server.rstrip("/").replace("https://", "wss://").replace("http://", "ws://")
    session_id: str | None = None
    try:
        with connect(f"{url}/ws/chat", additional_headers=headers, open_timeout=30) as socket:
            while True:
                text = message if message is not None else _prompt()
                if not text:
                    return
                request = {"probe": probe, "message": text, "session_id": session_id}
                socket.send(json.dumps(request))
                done = _stream_reply(socket)
                if done.get("type") == "error":
                    fail(done["message"], EXIT_FAILED)
                session_id = done.get("session_id") or session_id
                if message is not None:
                    if done.get("status") != "completed":
                        raise typer.Exit(EXIT_FAILED)
                    return
    except InvalidStatus as exc:
        fail(f"the server refused the chat socket (HTTP {exc.response.status_code})", EXIT_FAILED)
    except (OSError, WebSocketException) as exc:
        fail(f"cannot reach {server}: {exc}", EXIT_FAILED)


def _prompt() -> str:
    try:
        return input("you> ").strip() if sys.stdin.isatty() else sys.stdin.readline().strip()
    except EOFError:
        return ""


def _stream_reply(socket: Any) -> dict[str, Any]:
    while True:
        event = json.loads(socket.recv())
        if event["type"] == "token":
            console.print(event["text"], end="", markup=False)
        elif event["type"] == "tool":
            data = event["data"]
            if event["event"] == "approval_pending":
                console.print(
                    f"\n[yellow]waiting for approval {data['approval']['id']} "
                    f"of {data.get('command')!r} (legator approvals approve …)[/yellow]"
                )
            else:
                _print_tools({"tools": [{"name": event["event"], **data}]})
        else:
            console.print()
            if event["type"] == "done" and event.get("error"):
                console.print(f"[red]{event['status']}: {event['error']}[/red]")
            return dict(event)
