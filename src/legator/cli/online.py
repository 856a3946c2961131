"""Talking to a running control plane from the `legator` CLI.

The server comes from ``--server`` or ``LEGATOR_SERVER_URL``; the API key only from
``LEGATOR_API_KEY``: an argument would show in process listings, so ``--api-key`` is refused
with a message that says where the key goes.

Every request goes through ``client`` (a context manager) and ``check``: a server out of reach
or an answer that is not the API's JSON (an HTML page from a proxy in front, say) ends the
command with one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import httpx
import typer
from typer.core import TyperGroup

from legator.cli.common import EXIT_CONFLICT, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, fail
from legator.deploy.client import error_message, not_json, unreachable

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


@contextmanager
def client(server: str) -> Iterator[httpx.Client]:
    """An HTTP client of the control plane with the API key. A request that gets no answer
    (refused, timed out, broken off, in the block or while streaming) ends the command:
    ``error: cannot reach URL: reason``, exit 1."""
    try:
        with httpx.Client(
            base_url=server.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key()}"},
            timeout=httpx.Timeout(30, read=None),
        ) as http:
            yield http
    except httpx.HTTPError as exc:
        fail(unreachable(server, exc))


def check(response: httpx.Response) -> Any:
    """The JSON body of a successful response; otherwise the server's message and an exit
    code that says what went wrong. An answer that is not JSON (a sign-in page, a redirect
    to one) is an error too, not a traceback."""
    if response.is_redirect:
        fail(not_json(response))
    if response.status_code < 400:
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            fail(not_json(response))
    fail(
        f"{error_message(response)} (HTTP {response.status_code})",
        _EXIT_FOR_STATUS.get(response.status_code, EXIT_FAILED),
    )


def call(server: str, method: str, path: str, **kwargs: Any) -> Any:
    with client(server) as http:
        return check(http.request(method, path, **kwargs))
