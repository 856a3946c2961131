"""`legator approvals`: the approval queue of a running control plane."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from legator.cli.common import console, print_json, print_listing
from legator.cli.online import DEFAULT_SERVER, JsonFlag, ServerOpt, call

app = typer.Typer(help="Review and decide pending approvals (online).", no_args_is_help=True)
Reason = Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit trail).")]


def _show(approval: dict[str, Any]) -> None:
    console.print(f"[bold]{approval['id']}[/bold]  {approval['status']}")
    console.print(f"  command:   {approval['summary']}", highlight=False)
    console.print(f"  targets:   {', '.join(approval['targets'])}")
    console.print(
        f"  risk:      {approval['risk']}  level: {approval['level']}  mode: {approval['mode']}"
    )
    console.print(f"  why:       {'; '.join(approval['rationale'].get('drivers', []))}")
    console.print(f"  requester: {approval['requester']}  expires: {approval['expires_at']}")
    for decision in approval["decisions"]:
        console.print(
            f"  {decision['decision']:8s} by {decision['approver']}: {decision['reason']}"
        )
    if approval.get("result") is not None:
        console.print(f"  result:    {approval['result']}", highlight=False)


@app.command("list")
def list_approvals(
    status: Annotated[
        str | None, typer.Option(help="pending, approved, denied, expired…")
    ] = "pending",
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """List approvals (pending ones by default; --status all for every one)."""
    params = {} if status == "all" else {"status": status}
    print_listing(
        call(server, "GET", "/api/v1/approvals", params=params),
        json_output,
        "Approvals",
        ["id", "status", "risk", "targets", "command", "requester", "expires"],
        lambda a: (
            a["id"],
            a["status"],
            a["risk"],
            ",".join(a["targets"]),
            a["summary"],
            a["requester"],
            a["expires_at"],
        ),
    )


@app.command()
def show(
    approval_id: str,
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """Everything about one approval, with its rationale and decisions."""
    approval = call(server, "GET", f"/api/v1/approvals/{approval_id}")
    print_json(approval) if json_output else _show(approval)


def _decide(
    approval_id: str,
    decision: str,
    reason: str,
    server: str,
    json_output: bool,
) -> None:
    body = {"decision": decision, "reason": reason}
    approval = call(server, "POST", f"/api/v1/approvals/{approval_id}/decide", json=body)
    print_json(approval) if json_output else _show(approval)


@app.command()
def approve(
    approval_id: str,
    reason: Reason = "",
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """Approve: once enough approvers agree, the action runs (exactly once)."""
    _decide(approval_id, "approve", reason, server, json_output)


@app.command()
def deny(
    approval_id: str,
    reason: Reason = "",
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """Deny: the action never runs."""
    _decide(approval_id, "deny", reason, server, json_output)
