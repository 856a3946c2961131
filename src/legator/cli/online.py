"""Talking to a running control plane from the `legator` CLI.

The server comes from ``--server`` or ``LEGATOR_URL`` (default ``http://127.0.0.1:8080``); the
API key from ``LEGATOR_API_KEY`` or a file named by ``--key-file``, never from an argument,
where it would show in the process list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

from legator.cli.common import EXIT_CONFLICT, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, fail

DEFAULT_URL = "http://127.0.0.1:8080"
ServerOption = Annotated[
    str | None,
    typer.Option("--server", help="Control plane URL (default: $LEGATOR_URL or localhost:8080)."),
]
KeyFileOption = Annotated[
    Path | None,
    typer.Option("--key-file", help="File holding the API key (default: $LEGATOR_API_KEY)."),
]
_EXIT_FOR_STATUS = {400: EXIT_USAGE, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT, 422: EXIT_USAGE}


class Api:
    def __init__(self, server: str | None = None, key_file: Path | None = None) -> None:
        url = server or os.environ.get("LEGATOR_URL") or DEFAULT_URL
        key = key_file.read_text().strip() if key_file else os.environ.get("LEGATOR_API_KEY", "")
        if not key:
            fail("no API key: set LEGATOR_API_KEY or pass --key-file", EXIT_USAGE)
        self.client = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach {self.client.base_url}: {exc}", EXIT_FAILED)
        if response.status_code >= 400:
            self._fail(response)
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    @staticmethod
    def _fail(response: httpx.Response) -> NoReturn:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason_phrase
        fail(
            f"{response.status_code}: {message}",
            _EXIT_FOR_STATUS.get(response.status_code, EXIT_FAILED),
        )
