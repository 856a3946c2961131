"""What the probe keeps to deliver on its next connection (command results) while it has
none: bounded in number and in bytes. Past the bytes, the oldest results lose their output
first, keeping their status, exit code and a note; past the number, the oldest go whole."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import legator.fleet.protocol as p

OUTBOX_LIMIT = 1000
# A result carries up to 2 MiB of output (6 times that in JSON escapes); a probe that stays
# away for long would otherwise hold gigabytes.
OUTBOX_BYTES = 64 * 1024 * 1024
DROPPED_NOTE = "output dropped: held while disconnected, past the probe's outbox limit"


@dataclass
class _Held:
    envelope: p.Envelope
    size: int
    lean: bool  # nothing left to drop but the envelope itself


def _size(envelope: p.Envelope) -> int:
    return len(envelope.model_dump_json())


class Outbox:
    def __init__(self, limit: int = OUTBOX_LIMIT, max_bytes: int = OUTBOX_BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.bytes = 0
        self._held: deque[_Held] = deque()

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[p.Envelope]:
        return (held.envelope for held in self._held)

    def append(self, envelope: p.Envelope) -> None:
        size = _size(envelope)
        self._held.append(_Held(envelope, size, lean=not _has_output(envelope)))
        self.bytes += size
        while len(self._held) > self.limit:
            self.bytes -= self._held.popleft().size
        if self.bytes > self.max_bytes:
            self._drop_output()

    def first(self) -> p.Envelope:
        return self._held[0].envelope

    def popleft(self) -> p.Envelope:
        held = self._held.popleft()
        self.bytes -= held.size
        return held.envelope

    def _drop_output(self) -> None:
        for held in self._held:
            if self.bytes <= self.max_bytes:
                return
            if held.lean:
                continue
            held.envelope = _without_output(held.envelope)
            size = _size(held.envelope)
            self.bytes += size - held.size
            held.size, held.lean = size, True
        while self.bytes > self.max_bytes and len(self._held) > 1:
            self.bytes -= self._held.popleft().size


def _has_output(envelope: p.Envelope) -> bool:
    return envelope.type == p.T_COMMAND_RESULT and bool(
        envelope.payload.get("stdout") or envelope.payload.get("stderr")
    )


def _without_output(envelope: p.Envelope) -> p.Envelope:
    payload = dict(envelope.payload)
    error = payload.get("error")
    payload.update(
        stdout="",
        stderr="",
        truncated=True,
        error=f"{DROPPED_NOTE}; {error}" if error else DROPPED_NOTE,
    )
    return envelope.model_copy(update={"payload": payload})
