"""Sealed copies of the Podman secret values leger installed, so that rolling back a failed
apply can put a replaced secret's previous value back (Podman 4.3 cannot show a stored value).

``STATE/podman-secrets.json`` (0600, in the 0700 state directory) holds, per Podman secret
name, the ID Podman gave the secret when leger created it and the value sealed with
AES-256-GCM under ``STATE/.secret-seal-key`` (0600, created on first use). The associated data
binds the secret's name and Podman ID, so an entry moved onto another secret does not open.

A copy counts only while Podman holds a secret of that name *with that ID*: a secret created
or replaced by something else than leger has another ID, and leger then knows it has no copy
of its value. Values never leave this module except to go back to Podman on stdin.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from legator.core.security import write_private_file

_FORMAT = 1
_NONCE = 12
_KEY = 32


def _ad(name: str, podman_id: str) -> bytes:
    # Names and IDs are printable (no NUL): the separators keep the encoding unambiguous.
    return b"leger-podman-secret-v1\x00" + name.encode() + b"\x00" + podman_id.encode()


class SealError(RuntimeError):
    """The sealing key cannot be used (readable by others, or not a key)."""


class SealedSecrets:
    def __init__(self, state: Path) -> None:
        self.path = state / "podman-secrets.json"
        self.key_path = state / ".secret-seal-key"
        self._aead: AESGCM | None = None

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            if not self.key_path.exists():
                write_private_file(self.key_path, secrets.token_bytes(_KEY).hex() + "\n")
            mode = self.key_path.stat().st_mode & 0o777
            if mode & 0o077:
                raise SealError(
                    f"{self.key_path} is readable by others (mode {mode:o}); chmod 600 it"
                )
            try:
                key = bytes.fromhex(self.key_path.read_text().strip())
            except ValueError:
                key = b""
            if len(key) != _KEY:
                raise SealError(f"{self.key_path} does not hold a 32-byte hex key")
            self._aead = AESGCM(key)
        return self._aead

    def check(self) -> None:
        """Load (or create) the key, so a bad key file stops an apply before any change."""
        self._cipher()

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            raw = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}  # no copies (an unreadable file only means no rollback of values)
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            return {}
        entries = raw.get("secrets")
        return entries if isinstance(entries, dict) else {}

    def _save(self, entries: dict[str, dict[str, str]]) -> None:
        data = {"format": _FORMAT, "secrets": dict(sorted(entries.items()))}
        write_private_file(self.path, json.dumps(data, indent=2) + "\n")

    def get(self, name: str, podman_id: str) -> bytes | None:
        """The value leger created secret ``name`` with, if Podman's secret of that name is
        still the one leger created (``podman_id``); otherwise None."""
        entry = self._load().get(name)
        if not isinstance(entry, dict) or entry.get("id") != podman_id:
            return None
        try:
            sealed = base64.b64decode(entry["sealed"], validate=True)
        except (KeyError, TypeError, ValueError):
            return None
        if len(sealed) < _NONCE + 16:
            return None
        try:
            return self._cipher().decrypt(sealed[:_NONCE], sealed[_NONCE:], _ad(name, podman_id))
        except InvalidTag:
            return None

    def put(self, installed: dict[str, tuple[str, bytes]]) -> None:
        """Remember ``name -> (Podman ID, value)`` for secrets Podman now holds."""
        if not installed:
            return
        entries = self._load()
        for name, (podman_id, value) in installed.items():
            nonce = os.urandom(_NONCE)
            sealed = nonce + self._cipher().encrypt(nonce, value, _ad(name, podman_id))
            entries[name] = {"id": podman_id, "sealed": base64.b64encode(sealed).decode()}
        self._save(entries)

    def drop(self, names: Iterable[str]) -> None:
        """Forget the copies of removed secrets."""
        entries = self._load()
        gone = [name for name in names if name in entries]
        for name in gone:
            del entries[name]
        if gone:
            self._save(entries)

    def prune(self, live: dict[str, str]) -> None:
        """Forget every copy that no longer describes a secret Podman holds (``live``: name ->
        ID of all of Podman's secrets)."""
        entries = self._load()
        self.drop(
            n for n, e in entries.items() if not isinstance(e, dict) or live.get(n) != e.get("id")
        )
