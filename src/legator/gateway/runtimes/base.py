"""The contract every managed runtime meets: launch, stop, liveness, logs."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from legator.gateway.schemas import ModelOut, RuntimeArgs

# A backend keeps at most this much of its own output (llama.cpp logs every request).
LOG_MAX_BYTES = 64 << 20
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
# How a server (llama-server, uvicorn) or Podman says that another process holds its port.
PORT_TAKEN = re.compile(r"address already in use|couldn't bind", re.IGNORECASE)


class RuntimeError_(Exception):
    """A runtime could not do what it was asked; the message says why."""


class PortTaken(RuntimeError_):
    """The port picked for the backend was taken by another process before it could bind it."""


@dataclass(frozen=True)
class Launch:
    model: ModelOut
    port: int
    api_key: str
    workdir: Path  # private (0700) per-backend directory: key file, config, logs
    owner: str  # the control plane that launches it (host and data directory)

    @property
    def args(self) -> RuntimeArgs:
        return RuntimeArgs(**self.model.runtime_args)

    @property
    def total_context(self) -> int:
        # llama.cpp splits -c across the -np slots: each slot gets the model's context.
        return self.model.context_length * self.model.parallel


@dataclass(frozen=True)
class Handle:
    """How to find a launched backend again, also after a control-plane restart."""

    pid: int | None = None
    pid_started: float | None = None
    container: str | None = None


class Runtime(ABC):
    kind: str
    health_path: str = "/health"

    @abstractmethod
    async def start(self, launch: Launch) -> Handle: ...

    @abstractmethod
    async def stop(self, handle: Handle, *, grace_s: float = STOP_GRACE_S) -> None:
        """Stop and remove it: SIGTERM, then SIGKILL once ``grace_s`` has passed."""

    @abstractmethod
    async def alive(self, handle: Handle) -> bool: ...

    @abstractmethod
    async def logs(self, handle: Handle, workdir: Path, tail: int) -> str: ...

    async def holds_port(self, handle: Handle, port: int) -> bool:
        """Whether the backend itself listens on ``port``: not another process that took the
        port between its pick and the backend's bind. Podman binds a container's published
        port itself at ``podman run`` (which fails if it is taken) and holds it while the
        container lives, so nothing else can answer there."""
        return True

    async def port_taken(self, handle: Handle, workdir: Path) -> bool:
        """After the backend exited during its start: whether it was because its port was
        taken (its output says so)."""
        return False

    async def trim_logs(self, workdir: Path) -> None:
        """Keep a running backend's log from filling the disk (called every monitor round);
        nothing to do where the runtime bounds it itself."""
        return None

    async def orphans(self, known: set[str], owner: str) -> list[Handle]:
        """Backends this runtime runs for ``owner`` (or for no recorded owner) that the
        control plane does not know of."""
        return []
