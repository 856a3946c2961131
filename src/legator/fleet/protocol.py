"""The probe wire protocol: envelopes, payloads and signing.

Shared by the control plane and the probe, so it stays pure: stdlib, Pydantic and
``legator.core.canonical`` only. Every control-plane→probe envelope carries
``sig = HMAC-SHA256(probe_key, id|type|ts|canonical_json(payload))``; the probe key is
``HMAC-SHA256(master, "legator-probe-signing|" + probe_id + "|" + salt)``, where ``salt`` is
random and new at every enrolment and key rotation, so a new enrolment gives the probe a new
key and the old one verifies nothing. A probe enrolled before salts existed has an empty salt
and keeps the key it was given, ``HMAC-SHA256(master, "legator-probe-signing|" + probe_id)``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from legator.core.canonical import canonical_json

PROTOCOL_VERSION = 1
MAX_SKEW_S = 300.0
KEY_CONTEXT = "legator-probe-signing|"
_SALT = re.compile(r"[0-9a-f]{0,64}")
LEVELS = ("observe", "diagnose", "remediate")
Level = Literal["observe", "diagnose", "remediate"]

# Control plane → probe (always signed).
T_COMMAND = "command"
T_POLICY_UPDATE = "policy_update"
T_ROTATE_KEY = "rotate_key"
T_UPDATE = "update"
T_FILE_REQUEST = "file_request"
T_PING = "ping"
SIGNED_TYPES = frozenset(
    {T_COMMAND, T_POLICY_UPDATE, T_ROTATE_KEY, T_UPDATE, T_FILE_REQUEST, T_PING}
)
# Probe → control plane (authenticated by the probe's bearer key on the socket).
T_HELLO = "hello"
T_HEARTBEAT = "heartbeat"
T_INVENTORY = "inventory"
T_COMMAND_RESULT = "command_result"
T_OUTPUT = "output"
T_ACK = "ack"
T_FILE_RESULT = "file_result"

# Limits on what a probe sends. A compromised host holds its own probe key, so everything
# below arrives from a possibly hostile peer: text is clipped (never refused, so a long
# error message cannot cost a legitimate result), numbers that land in 32-bit columns are
# bounded, and an output chunk larger than the probe ever sends is refused.
MAX_ID_CHARS = 64  # request ids and envelope refs (the control plane's are 36-char UUIDs)
MAX_NAME_CHARS = 255  # hostnames, versions, message types
MAX_TEXT_CHARS = 2000  # error and reason texts, as logged, audited and published
OUTPUT_CAP = 1024 * 1024  # characters of one stream's output kept per command (the probe
# keeps OUTPUT_CAP bytes per stream, legator.probe.executor; UTF-8 never decodes to more
# characters than bytes)
MAX_CHUNK_CHARS = 64 * 1024  # one output chunk (the probe reads 64 KiB at a time)
INT32_MAX = 2**31 - 1


def utc_ts() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def parse_ts(value: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp; ValueError if it is not one."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("timestamp without a timezone")
    return parsed.timestamp()


def new_key_salt() -> str:
    """A fresh salt for one enrolment (or key rotation) of a probe: 128 random bits, hex."""
    return secrets.token_hex(16)


def derive_probe_key(master: bytes, probe_id: str, salt: str = "") -> str:
    """The signing key of one enrolment of a probe, hex. Both ends hold exactly this value.

    ``salt`` is the enrolment's (``Probe.key_salt``). The empty salt is the one of probes
    enrolled before salts existed: it derives the key they were given then, unchanged.
    """
    if not _SALT.fullmatch(salt) or "|" in probe_id:
        # Unambiguous material: no probe id/salt pair can stand for another.
        raise ValueError("a probe key salt is hex, and a probe id holds no '|'")
    material = KEY_CONTEXT + probe_id + (f"|{salt}" if salt else "")
    return hmac.new(master, material.encode(), hashlib.sha256).hexdigest()


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64)
    type: str = Field(min_length=1, max_length=64)
    ts: str = Field(min_length=1, max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict)
    sig: str | None = Field(None, max_length=128)

    def material(self) -> bytes:
        return f"{self.id}|{self.type}|{self.ts}|{canonical_json(self.payload)}".encode()


def new_envelope(type_: str, payload: dict[str, Any] | BaseModel) -> Envelope:
    body = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    return Envelope(id=str(uuid.uuid4()), type=type_, ts=utc_ts(), payload=body)


def sign(envelope: Envelope, key_hex: str) -> Envelope:
    digest = hmac.new(bytes.fromhex(key_hex), envelope.material(), hashlib.sha256).hexdigest()
    return envelope.model_copy(update={"sig": digest})


def signed(type_: str, payload: dict[str, Any] | BaseModel, key_hex: str) -> Envelope:
    return sign(new_envelope(type_, payload), key_hex)


class VerificationError(Exception):
    """Why an envelope was refused; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Verifier:
    """Checks signature, freshness and uniqueness of incoming control-plane envelopes.

    Ids seen within the skew window are remembered; older envelopes are refused as stale,
    so the replay memory never needs to outlive the window.
    """

    def __init__(self, key_hex: str, *, max_skew_s: float = MAX_SKEW_S, capacity: int = 100_000):
        self.key_hex = key_hex
        self.max_skew_s = max_skew_s
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()

    def verify(self, envelope: Envelope, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if not envelope.sig:
            raise VerificationError(
                "unsigned", f"{envelope.type} message {envelope.id} is unsigned"
            )
        expected = sign(envelope, self.key_hex).sig or ""
        if not hmac.compare_digest(expected, envelope.sig):
            raise VerificationError(
                "bad_signature", f"{envelope.type} message {envelope.id} has an invalid signature"
            )
        try:
            sent = parse_ts(envelope.ts)
        except ValueError:
            raise VerificationError(
                "bad_timestamp", f"timestamp {envelope.ts!r} is not RFC 3339"
            ) from None
        if abs(now - sent) > self.max_skew_s:
            raise VerificationError(
                "stale", f"message {envelope.id} is {abs(now - sent):.0f}s off this host's clock"
            )
        self._expire(now)
        if envelope.id in self._seen:
            raise VerificationError("replayed", f"message id {envelope.id} was already received")
        self._seen[envelope.id] = now
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        horizon = now - 2 * self.max_skew_s
        while self._seen:
            oldest_id, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon:
                break
            del self._seen[oldest_id]


# ---- payloads -------------------------------------------------------------------------------


def _clip(limit: int, marker: str = "") -> AfterValidator:
    def clip(value: str | None) -> str | None:
        if value is None or len(value) <= limit:
            return value
        return value[: limit - len(marker)] + marker

    return AfterValidator(clip)


ProbeId = Annotated[str, _clip(MAX_ID_CHARS)]  # a clipped id matches nothing: harmless
ProbeName = Annotated[str, _clip(MAX_NAME_CHARS)]
ProbeText = Annotated[str, _clip(MAX_TEXT_CHARS, " …[truncated]")]


class Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Hello(Payload):
    probe_id: ProbeId
    version: ProbeName
    hostname: ProbeName
    max_level: Level
    policy_id: ProbeId | None = None
    protocol: int = PROTOCOL_VERSION
    running: list[ProbeId] = Field(default_factory=list)


class Heartbeat(Payload):
    # NaN and infinities are not JSON: one would fail the batched liveness write of every
    # probe (PostgreSQL refuses them).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    disk_percent: float = 0.0
    load1: float = 0.0
    load5: float = 0.0
    load15: float = 0.0
    uptime_s: float = 0.0
    running: int = 0


class CommandSpec(Payload):
    request_id: str
    command: str = Field(min_length=1, max_length=65536)
    args: list[str] = Field(default_factory=list)
    shell: bool = False
    timeout_s: float = Field(60.0, gt=0, le=86400)
    level: Level = "observe"
    env: dict[str, str] = Field(default_factory=dict)
    stream: bool = False


CommandStatus = Literal["completed", "failed", "timeout", "refused", "rejected", "error", "lost"]


class CommandResult(Payload):
    request_id: ProbeId | None = None
    status: CommandStatus
    exit_code: int | None = Field(None, ge=-INT32_MAX - 1, le=INT32_MAX)
    stdout: str = ""
    stderr: str = ""
    duration_ms: int = Field(0, ge=0, le=INT32_MAX)
    truncated: bool = False
    error: ProbeText | None = None
    reason: ProbeText | None = None

    @model_validator(mode="after")
    def _cap_output(self) -> CommandResult:
        if len(self.stdout) > OUTPUT_CAP:
            self.stdout, self.truncated = self.stdout[:OUTPUT_CAP], True
        if len(self.stderr) > OUTPUT_CAP:
            self.stderr, self.truncated = self.stderr[:OUTPUT_CAP], True
        return self


class OutputChunk(Payload):
    request_id: ProbeId
    seq: int = Field(ge=0, le=INT32_MAX)
    stream: Literal["stdout", "stderr"]
    data: str = Field(max_length=MAX_CHUNK_CHARS)


class PolicySpec(Payload):
    policy_id: str | None = None
    name: str = ""
    level: Level = "observe"
    allow: list[str] = Field(default_factory=list)
    block: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)


class RotateKey(Payload):
    api_key: str
    # The signing key of the new salt. A probe that saves it says so in its ack's detail
    # (``signing_key: "rotated"``); one that predates it ignores it and keeps its old key.
    signing_key: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


SIGNING_KEY_ROTATED = "rotated"  # the value of ``signing_key`` in the ack's detail


class UpdateSpec(Payload):
    request_id: str
    url: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class FileRequest(Payload):
    request_id: str
    op: Literal["read", "readlines", "search", "stat"]
    path: str = Field(min_length=1, max_length=4096)  # PATH_MAX
    start: int = Field(1, ge=1)
    end: int | None = Field(None, ge=1)
    pattern: str | None = Field(None, max_length=1000)
    max_bytes: int = Field(1024 * 1024, ge=1, le=16 * 1024 * 1024)


class FileResult(Payload):
    request_id: ProbeId
    ok: bool
    data: Any = None
    error: ProbeText | None = None


class Ack(Payload):
    ref: ProbeId  # the id of the envelope acknowledged
    type: ProbeName
    ok: bool = True
    error: ProbeText | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
