"""setec's semantics over the encrypted store: names, versions, access checks and audit.

Both `legerd` (setec wire format) and the control plane (``/api/v1/secrets``) call this; it
knows callers and rules, not HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from legator.secrets.acl import Action
from legator.secrets.audit import AuditSink
from legator.secrets.errors import (
    AccessDenied,
    InvalidRequest,
    SecretNotFound,
    SecretsError,
    ValueNotChanged,
    VersionClaimed,
)
from legator.secrets.identity import Caller
from legator.secrets.quota import Quota, QuotaExceeded
from legator.secrets.store import MAX_VERSION, SecretInfo, SqlStore

MAX_NAME_BYTES = 512
RESERVED_PREFIX = "_internal/"
MAX_VALUE_BYTES = 1 << 20


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidRequest("bad request: secret name is required")
    raw = name.encode()
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidRequest(f"bad request: secret name is longer than {MAX_NAME_BYTES} bytes")
    if any(b < 0x20 or b > 0x7E for b in raw):
        raise InvalidRequest("bad request: secret name must be printable ASCII")
    if name.startswith(RESERVED_PREFIX):
        raise InvalidRequest(f"bad request: names starting with {RESERVED_PREFIX} are reserved")
    return name


def validate_version(version: object, *, allow_zero: bool = True) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidRequest("bad request: version must be a non-negative integer")
    if version > MAX_VERSION:
        raise InvalidRequest(f"bad request: version must be at most {MAX_VERSION}")
    if version == 0 and not allow_zero:
        raise InvalidRequest("invalid version, please specify a version > 0")
    return version


def validate_value(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidRequest("bad request: value must be bytes")
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidRequest(f"bad request: value is larger than {MAX_VALUE_BYTES} bytes")
    return value


# The ``outcome`` of an audit line: what became of an authorised call that failed.
OK, DENIED = "ok", "denied"


def failure_outcome(exc: SecretsError) -> str:
    if isinstance(exc, SecretNotFound):
        return "not-found"
    if isinstance(exc, VersionClaimed):
        return "version-claimed"
    if isinstance(exc, QuotaExceeded):
        return "over-quota"
    if isinstance(exc, InvalidRequest):
        return "refused"
    return "error"


@dataclass(frozen=True)
class SecretValue:
    value: bytes
    version: int


class SecretsService:
    def __init__(self, store: SqlStore, audit: AuditSink, quota: Quota | None = None) -> None:
        self.store = store
        self.audit = audit
        self.quota = quota or Quota()

    def _record(
        self,
        caller: Caller,
        action: str,
        name: str,
        version: int,
        outcome: str,
        *,
        durable: bool = False,
    ) -> None:
        self.audit.record(
            principal=caller.principal,
            action=action,
            secret=name,
            version=version,
            authorized=outcome != DENIED,
            durable=durable,
            outcome=outcome,
            transport=caller.transport,
        )

    def _check(self, caller: Caller, action: Action, name: str, version: int = 0) -> None:
        if not caller.can(action, name):
            self._record(caller, action.value, name, version, DENIED)
            raise AccessDenied()

    @contextmanager
    def _audit_failure(
        self, caller: Caller, action: str, name: str, version: int = 0
    ) -> Iterator[None]:
        """An authorised call that fails in the store (no such secret or version, a version
        already used, a refused change) is audited too, with its outcome. Nothing changed, so
        its line needs no fsync of its own."""
        try:
            yield
        except ValueNotChanged:
            raise  # audited as a read of the version the caller holds
        except SecretsError as exc:
            self._record(caller, action, name, version, failure_outcome(exc))
            raise

    def _audit_hook(self, caller: Caller, action: str, name: str):  # type: ignore[no-untyped-def]
        def hook(version: int) -> None:
            self._record(caller, action, name, version, OK, durable=True)

        return hook

    def _audit_read(
        self, caller: Caller, action: str, name: str, version: int, outcome: str = OK
    ) -> None:
        self._record(caller, action, name, version, outcome)

    # reads

    def list(self, caller: Caller) -> list[SecretInfo]:
        visible = [i for i in self.store.list() if caller.can(Action.INFO, i.name)]
        self._audit_read(caller, "list", "", 0)
        return visible

    def info(self, caller: Caller, name: str) -> SecretInfo:
        name = validate_name(name)
        self._check(caller, Action.INFO, name)
        with self._audit_failure(caller, "info", name):
            info = self.store.info(name)
        self._audit_read(caller, "info", name, info.active_version)
        return info

    def get(
        self, caller: Caller, name: str, version: int = 0, update_if_changed: bool = False
    ) -> SecretValue:
        """Version 0: the active one. With ``update_if_changed`` and a version, the active
        value unless it is that version (then ValueNotChanged)."""

        name = validate_name(name)
        version = validate_version(version)
        self._check(caller, Action.GET, name, version)
        with self._audit_failure(caller, "get", name, version):
            if update_if_changed and version:
                if self.store.active_version(name) == version:
                    self._audit_read(caller, "get", name, version, "unchanged")
                    raise ValueNotChanged()
                version = 0
            value, served = self.store.get(name, version)
        self._audit_read(caller, "get", name, served)
        return SecretValue(value, served)

    # writes

    def put(self, caller: Caller, name: str, value: bytes) -> int:
        name = validate_name(name)
        value = validate_value(value)
        self._check(caller, Action.PUT, name)
        with self._audit_failure(caller, "put", name):
            return self.store.put(
                name,
                value,
                self._audit_hook(caller, "put", name),
                writer=caller.principal,
                quota=self.quota,
            )

    def create_version(self, caller: Caller, name: str, version: int, value: bytes) -> None:
        name = validate_name(name)
        version = validate_version(version, allow_zero=False)
        value = validate_value(value)
        self._check(caller, Action.CREATE_VERSION, name, version)
        with self._audit_failure(caller, "create-version", name, version):
            self.store.create_version(
                name,
                version,
                value,
                self._audit_hook(caller, "create-version", name),
                writer=caller.principal,
                quota=self.quota,
            )

    def activate(self, caller: Caller, name: str, version: int) -> None:
        name = validate_name(name)
        version = validate_version(version, allow_zero=False)
        self._check(caller, Action.ACTIVATE, name, version)
        with self._audit_failure(caller, "activate", name, version):
            self.store.activate(name, version, self._audit_hook(caller, "activate", name))

    def delete(self, caller: Caller, name: str) -> None:
        name = validate_name(name)
        self._check(caller, Action.DELETE, name)
        with self._audit_failure(caller, "delete", name):
            self.store.delete(name, self._audit_hook(caller, "delete", name))

    def delete_version(self, caller: Caller, name: str, version: int) -> None:
        name = validate_name(name)
        version = validate_version(version, allow_zero=False)
        self._check(caller, Action.DELETE, name, version)
        with self._audit_failure(caller, "delete-version", name, version):
            self.store.delete_version(
                name, version, self._audit_hook(caller, "delete-version", name)
            )
