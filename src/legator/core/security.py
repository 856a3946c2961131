"""Small cryptographic helpers shared by every wing: tokens, hashes, passwords, HMAC."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

API_KEY_PREFIX = "lgk_"
_password_hasher = PasswordHasher()


def random_hex(nbytes: int = 32) -> str:
    return secrets.token_hex(nbytes)


_API_KEY_SHAPE = re.compile(re.escape(API_KEY_PREFIX) + "[0-9a-f]{64}")


def new_api_key() -> str:
    """A fresh API key: ``lgk_`` + 64 hex characters."""
    return API_KEY_PREFIX + secrets.token_hex(32)


def looks_like_api_key(value: str) -> bool:
    return _API_KEY_SHAPE.fullmatch(value) is not None


def sha256_hex(value: str) -> str:
    """Digest for high-entropy tokens (API keys, session ids): fast, and safe because the
    input is random; passwords use argon2 instead."""
    return hashlib.sha256(value.encode()).hexdigest()


def hash_password(password: str) -> str:
    return _password_hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    if not password_hash:
        # Spend the same time as a real check so a missing user is not distinguishable.
        _password_hasher.hash(password)
        return False
    try:
        return _password_hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def random_password(length: int = 24) -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    return "".join(secrets.choice(alphabet) for _ in range(length))


def hmac_sha256_hex(key: bytes, message: str | bytes) -> str:
    data = message.encode() if isinstance(message, str) else message
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def write_private_file(path: Path, content: str) -> None:
    """Replace ``path`` at once with ``content``, mode 0600 from the start (no window where
    it is world-readable). The content is written to a new file of a unique name first
    (``mkstemp``: created exclusively, never an existing file or link someone planted in a
    shared folder), so concurrent writers each replace the file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_or_create_signing_key(configured: str | None, data_dir: Path | None) -> bytes:
    """The master signing key: from settings, else ``<data_dir>/signing.key``, created once.

    Without a data dir (in-memory mode) a fresh key lives only as long as the process.
    """
    if configured:
        return bytes.fromhex(configured)
    if data_dir is None:
        return secrets.token_bytes(32)
    path = data_dir / "signing.key"
    if path.exists():
        raw = path.read_text().strip()
        try:
            key = bytes.fromhex(raw)
        except ValueError:
            raise ValueError(f"{path} does not hold a hex signing key") from None
        if len(key) < 32:
            raise ValueError(f"{path} holds a key shorter than 32 bytes")
        return key
    key = secrets.token_bytes(32)
    write_private_file(path, key.hex() + "\n")
    return key


def mask_url(url: str) -> str:
    """``url`` with the credentials it may hold hidden: those of its userinfo
    (``http://user:pw@host`` → ``http://user:***@host``, ``http://token@host`` →
    ``http://***@host``) and every query value (``?key=sk-1`` → ``?key=***``: a service
    that takes its key in the query string gets no other place for it)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        userinfo, _, host = parts.netloc.rpartition("@")
        user, colon, _secret = userinfo.partition(":")
        parts = parts._replace(netloc=f"{user + ':' if colon else ''}***@{host}")
    if parts.query:
        names = (field.partition("=") for field in parts.query.split("&"))
        parts = parts._replace(
            query="&".join(f"{n}{eq}{'***' if eq else ''}" for n, eq, _ in names)
        )
    return urlunsplit(parts)
