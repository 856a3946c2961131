"""Talking to a running control plane from the `legator` CLI.

The server comes from ``--server`` or ``LEGATOR_SERVER_URL``; the API key only from
``LEGATOR_API_KEY``: an argument would show in process listings, so ``--api-key`` is refused
with a message that says where the key goes.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import httpx
import typer
from typer.core import TyperGroup

from legator.cli.common import EXIT_CONFLICT, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, fail

DEFAULT_SERVER = "http://127.0.0.1:8080"
KEY_ENV = "LEGATOR_API_KEY"
KEY_FLAG_REFUSED = (
    f"--api-key is not accepted: a key in the arguments shows in process listings; "
    f"set {KEY_ENV} instead"
)
ServerOpt = Annotated[
    str,
    typer.Option("--server", envvar="LEGATOR_SERVER_URL", help="Control plane URL."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_EXIT_FOR_STATUS = {400: EXIT_USAGE, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT, 422: EXIT_USAGE}


class LegatorGroup(TyperGroup):
    """The ``legator`` command group. It sees the whole command line, so it refuses an
    ``--api-key`` among any command's options (those before ``--``) with a message that
    says where the key goes, rather than Click's "No such option"."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        options = args[: args.index("--")] if "--" in args else args
        if any(arg == "--api-key" or arg.startswith("--api-key=") for arg in options):
            fail(KEY_FLAG_REFUSED, EXIT_USAGE)
        return super().parse_args(ctx, args)


def api_key() -> str:
    key = os.environ.get(KEY_ENV, "")
    if not key:
        fail(f"an API key is needed: set {KEY_ENV}", EXIT_USAGE)
    return key


def client(server: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.rstrip("/"),
        headers={"Authorization": f"Bearer {api_key()}"},
        timeout=httpx.Timeout(30, read=None),
    )


def check(response: httpx.Response) -> Any:
    """The JSON body of a successful response; otherwise the server's message and an exit
    code that says what went wrong."""
    if response.status_code < 400:
        return response.json() if response.content else None
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    fail(
        f"{message} (HTTP {response.status_code})",
        _EXIT_FOR_STATUS.get(response.status_code, EXIT_FAILED),
    )


def call(server: str, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with client(server) as http:
            return check(http.request(method, path, **kwargs))
    except httpx.HTTPError as exc:
        fail(f"cannot reach {server}: {exc}")
