"""Where install and update get secret values from.

The deploy path only needs ``get(name) -> bytes``. The sources, first match wins: the local
legerd (where `leger secrets sync` keeps the signed-in user's deploy secrets, as
``leger/<user>/<name>``), then ``LEGER_SECRET_<NAME>`` variables, then one file per secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from legator.secrets.client import Client
from legator.secrets.errors import SecretNotFound, SecretsError
from legator.secrets.server import DEFAULT_SOCKET

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,200}\Z")


class MissingSecret(LookupError):
    def __init__(self, name: str, where: str = "") -> None:
        self.name = name
        super().__init__(f"missing secret {name}" + (f" ({where})" if where else ""))


class SecretSource(Protocol):
    def get(self, name: str) -> bytes:
        """The current value; raises ``MissingSecret`` naming the secret."""
        ...

    def describe(self) -> str: ...


def _check(name: str) -> None:
    if not _NAME.match(name):
        raise MissingSecret(name, "not a valid secret name")


class DirSecretSource:
    """One file per secret: ``DIR/NAME`` holds the value (trailing newline kept as is)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def get(self, name: str) -> bytes:
        _check(name)
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            raise MissingSecret(name, f"no file {self.directory / name}") from None

    def describe(self) -> str:
        return f"directory {self.directory}"


class EnvSecretSource:
    """``LEGER_SECRET_<NAME>`` with ``-`` and ``.`` as ``_``, upper case."""

    prefix = "LEGER_SECRET_"

    def get(self, name: str) -> bytes:
        _check(name)
        variable = self.prefix + re.sub(r"[-.]", "_", name).upper()
        value = os.environ.get(variable)
        if value is None:
            raise MissingSecret(name, f"{variable} is not set")
        return value.encode()

    def describe(self) -> str:
        return f"environment {self.prefix}*"


class ChainSecretSource:
    """The first source that has the secret wins."""

    def __init__(self, sources: Sequence[SecretSource]) -> None:
        self.sources = list(sources)

    def get(self, name: str) -> bytes:
        for source in self.sources:
            try:
                return source.get(name)
            except MissingSecret:
                continue
        raise MissingSecret(name, "looked in " + ", ".join(s.describe() for s in self.sources))

    def describe(self) -> str:
        return " then ".join(source.describe() for source in self.sources)


class LegerdSecretSource:
    """The signed-in user's deploy secrets in the local legerd: ``leger/<user>/<name>``."""

    def __init__(self, user: str, *, server: str | None = None, socket: Path | None = None):
        self.user = user
        self.server = server
        self.socket = socket

    def _client(self) -> Client:
        return Client(self.server) if self.server else Client(socket_path=self.socket)

    def get(self, name: str) -> bytes:
        _check(name)
        full = f"leger/{self.user}/{name}"
        try:
            with self._client() as client:
                return client.get(full)[0]
        except SecretNotFound:
            raise MissingSecret(name, f"legerd has no {full}; run `leger secrets sync`") from None
        except SecretsError as exc:
            raise MissingSecret(name, f"legerd: {exc.message}") from None

    def describe(self) -> str:
        return f"legerd {self.server or self.socket} (leger/{self.user}/*)"


def default_source(state_dir: Path, user: str | None = None) -> SecretSource:
    """The sources install and update read secrets from, first match wins. legerd is asked
    when a user is signed in and legerd is configured or its socket exists."""
    directory = Path(os.environ.get("LEGER_SECRETS_DIR") or state_dir / "secrets")
    sources: list[SecretSource] = [EnvSecretSource(), DirSecretSource(directory)]
    server = os.environ.get("LEGER_SECRETS_SERVER")
    socket = Path(os.environ.get("LEGER_SECRETS_SOCKET") or DEFAULT_SOCKET)
    if user and (server or socket.exists()):
        sources.insert(0, LegerdSecretSource(user, server=server, socket=socket))
    return ChainSecretSource(sources)
