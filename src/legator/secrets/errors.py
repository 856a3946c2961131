"""The errors of the secrets service. Each carries the HTTP status and the short plain-text
message that setec sends for it, so the wire format is decided in one place.

They share statuses with ``core.errors`` but are deliberately not ``AppError``s: the core
HTTP handler sends an ``AppError``'s message to the caller, which for ``StoreCorrupted``
names the secret and version that failed to decrypt, and every ``except AppError`` in the
control plane and the CLIs would start catching them. The control-plane mount turns the ones
a caller may see into core errors with its own messages (``secrets.router.run``)."""

from __future__ import annotations


class SecretsError(Exception):
    status_code = 500
    message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message


class InvalidRequest(SecretsError):
    status_code = 400
    message = "bad request"


class AccessDenied(SecretsError):
    status_code = 403
    message = "access denied"


class SecretNotFound(SecretsError):
    status_code = 404
    message = "not found"


class ValueNotChanged(SecretsError):
    """The active version is the one the caller already holds (setec's 304)."""

    status_code = 304
    message = ""


class VersionClaimed(SecretsError):
    status_code = 412
    message = "version already set"


class StoreCorrupted(SecretsError):
    """A value could not be decrypted: tampered row, swapped ciphertext or wrong key."""

    status_code = 500
    message = "internal error"


class KekError(SecretsError):
    """The key-encryption key is missing, malformed or does not open this store."""


class NotAStore(SecretsError):
    """The database named holds no secrets store (or one from before quotas, for a recount)."""
