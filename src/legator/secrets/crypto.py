"""Envelope encryption for secret values.

Each value is sealed with AES-256-GCM under a random data key (DEK). The DEK is stored in the
database wrapped (AES-256-GCM again) by a key-encryption key (KEK) that never touches the
database. The associated data of a value binds the secret's name and version, so a ciphertext
copied onto another row, or another version of the same secret, fails to open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from legator.core.security import write_private_file
from legator.secrets.errors import KekError, StoreCorrupted

KEY_BYTES = 32
NONCE_BYTES = 12
_FORMAT = b"\x01"  # first byte of every sealed value: lets a later format coexist
_DEK_AD = b"legerd-dek-v1"
KEK_ENV = "LEGERD_KEK"
KEK_CREDENTIAL = "legerd-kek"


@dataclass(frozen=True)
class Kek:
    key: bytes
    source: str  # where it came from, for messages: never the key itself

    @property
    def key_id(self) -> str:
        """A public fingerprint of the key, stored next to the wrapped data key."""
        return hmac.new(self.key, b"legerd-kek-id", hashlib.sha256).hexdigest()[:16]


def parse_key(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise KekError(f"{source} does not hold a hex key") from None
    if len(key) != KEY_BYTES:
        raise KekError(f"{source} holds a {len(key)}-byte key; a 32-byte (64 hex) key is needed")
    return key


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def write_key_file(path: Path, key: bytes) -> None:
    """Replace ``path`` with ``key`` (0600), the rename itself on disk when this returns: key
    rotation drops the old key's wrapping next, and a key file that came back as the old key
    after a crash would open nothing."""
    write_private_file(path, key.hex() + "\n")
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_kek(key_file: Path, *, create: bool = True) -> Kek:
    """The KEK from, in order: ``$LEGERD_KEK``, the systemd credential ``legerd-kek`` in
    ``$CREDENTIALS_DIRECTORY``, or ``key_file`` (created 0600 on first start)."""
    env = os.environ.get(KEK_ENV)
    if env:
        return Kek(parse_key(env, f"${KEK_ENV}"), f"${KEK_ENV}")
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / KEK_CREDENTIAL).is_file():
        path = Path(cred_dir) / KEK_CREDENTIAL
        return Kek(parse_key(path.read_text(), f"credential {path}"), f"credential {path}")
    return load_key_file(key_file, create=create)


def load_key_file(key_file: Path, *, create: bool = True) -> Kek:
    """The KEK in ``key_file`` (hex), created 0600 when absent and ``create`` is true."""
    if key_file.exists():
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise KekError(f"{key_file} is readable by others (mode {mode:o}); chmod 600 it")
        return Kek(parse_key(key_file.read_text(), str(key_file)), str(key_file))
    if not create:
        raise KekError(f"no key-encryption key: {key_file} does not exist and ${KEK_ENV} is unset")
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate_key()
    write_key_file(key_file, key)
    return Kek(key, str(key_file))


def wrap_dek(kek: Kek, dek: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return _FORMAT + nonce + AESGCM(kek.key).encrypt(nonce, dek, _DEK_AD)


def unwrap_dek(kek: Kek, wrapped: bytes) -> bytes:
    if wrapped[:1] != _FORMAT or len(wrapped) < 1 + NONCE_BYTES + 16:
        raise KekError("the stored data key is malformed")
    nonce, body = wrapped[1 : 1 + NONCE_BYTES], wrapped[1 + NONCE_BYTES :]
    try:
        return AESGCM(kek.key).decrypt(nonce, body, _DEK_AD)
    except InvalidTag:
        raise KekError(
            f"the key-encryption key from {kek.source} does not open this store's data key"
        ) from None


def _value_ad(name: str, version: int) -> bytes:
    # Names are printable (no NUL), so the separator makes the encoding unambiguous.
    return b"legerd-value-v1\x00" + name.encode() + b"\x00" + str(version).encode()


class Sealer:
    """Seals and opens values under one data key. Thread-safe (AESGCM holds no state)."""

    def __init__(self, dek: bytes) -> None:
        self._aead = AESGCM(dek)

    def seal(self, name: str, version: int, value: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return _FORMAT + nonce + self._aead.encrypt(nonce, value, _value_ad(name, version))

    def open(self, name: str, version: int, sealed: bytes) -> bytes:
        if sealed[:1] != _FORMAT or len(sealed) < 1 + NONCE_BYTES + 16:
            raise StoreCorrupted(f"stored value of {name!r} version {version} is malformed")
        nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, _value_ad(name, version))
        except InvalidTag:
            raise StoreCorrupted(
                f"stored value of {name!r} version {version} failed authentication "
                "(tampered, moved from another row, or sealed under another key)"
            ) from None
