"""Talking to a running control plane from the `legator` CLI.

The server comes from ``--server`` or ``LEGATOR_SERVER_URL``; the API key from
``LEGATOR_API_KEY`` (or ``--api-key``, which shows in process listings, so the variable is
better).
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer

from legator.cli.common import EXIT_CONFLICT, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, fail

DEFAULT_SERVER = "http://127.0.0.1:8080"
ServerOpt = Annotated[
    str,
    typer.Option("--server", envvar="LEGATOR_SERVER_URL", help="Control plane URL."),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="LEGATOR_API_KEY",
        help="API key (lgk_…); prefer the "
        "environment variable, so it stays out of process listings.",
        show_default=False,
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_EXIT_FOR_STATUS = {400: EXIT_USAGE, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT, 422: EXIT_USAGE}


def client(server: str, key: str | None) -> httpx.Client:
    if not key:
        fail("an API key is needed: set LEGATOR_API_KEY or pass --api-key", EXIT_USAGE)
    return httpx.Client(
        base_url=server.rstrip("/"),
        headers={"Authorization": f"Bearer {key}"},
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


def call(server: str, key: str | None, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with client(server, key) as http:
            return check(http.request(method, path, **kwargs))
    except httpx.HTTPError as exc:
        fail(f"cannot reach {server}: {exc}")
