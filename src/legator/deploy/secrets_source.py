"""Where install and update get secret values from.

The deploy path only needs ``get(name) -> bytes``. Today's sources read files or environment
variables; legerd plugs in at ``default_source`` (see LEGERD ADAPTER SLOT below).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,200}$")


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


def default_source(state_dir: Path) -> SecretSource:
    """The sources install and update read secrets from, first match wins.

    LEGERD ADAPTER SLOT: when ``legator.secrets.client.Client`` is available, put a
    ``LegerdSecretSource`` (``get(name)`` -> ``client.get(name)[0]``, translating its not-found
    error into ``MissingSecret(name)``) at the front of this chain.
    """
    directory = Path(os.environ.get("LEGER_SECRETS_DIR") or state_dir / "secrets")
    return ChainSecretSource([EnvSecretSource(), DirSecretSource(directory)])
