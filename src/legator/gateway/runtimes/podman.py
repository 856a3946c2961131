"""``podman``: one container per model, ``sovereign-llamacpp-<model_id>``.

Isolation: a non-root UID from 10000-65000 unique among our containers, every capability
dropped, no-new-privileges, the model directory mounted read-only,
the port published on 127.0.0.1 only. The per-backend key is a Podman secret mounted as a
file (``/run/secrets/…``): never in the arguments, the environment or ``podman inspect``.
GPUs by CDI (``nvidia.com/gpu=all``) or ``/dev/dri`` when the model offloads layers.
Podman's engine options (runc, cgroupfs, ulimits) come from containers.conf.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path

from legator.core.security import write_private_file
from legator.gateway.runtimes.base import (
    LOG_MAX_BYTES,
    PORT_TAKEN,
    STOP_GRACE_S,
    Handle,
    Launch,
    PortTaken,
    Runtime,
    RuntimeError_,
)
from legator.gateway.runtimes.process import _python_server_config

PREFIX = "sovereign-llamacpp-"
LABEL = "io.legator.backend"
OWNER_LABEL = "io.legator.owner"  # another control plane's containers on this host are not ours
INNER_PORT = 8080
UID_MIN, UID_MAX = 10000, 65000
SECRET_DIR = "/run/secrets"  # noqa: S105 (a path, not a secret)
_NAME_ESCAPES = {"_": "__", ":": "_-"}


async def podman(
    *args: str, stdin: bytes | None = None, limit_s: float = 60, merge: bool = False
) -> str:
    # Podman insists on a real pipe for `secret create NAME -` (asyncio would hand it a
    # socket), so secret data goes through os.pipe; it is small enough to fit the buffer.
    read_end: int | None = None
    if stdin is not None:
        read_end, write_end = os.pipe()
        with os.fdopen(write_end, "wb") as sink:
            sink.write(stdin)
    # Output goes to files, not pipes: `podman run --detach` leaves conmon holding the
    # inherited descriptors open, and reading a pipe to EOF would then never end.
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        try:
            proc = await asyncio.create_subprocess_exec(
                "podman",
                *args,
                stdin=read_end if read_end is not None else asyncio.subprocess.DEVNULL,
                stdout=out_file,
                stderr=err_file,
            )
        except OSError as exc:
            raise RuntimeError_(f"podman is not available: {exc}") from None
        finally:
            if read_end is not None:
                os.close(read_end)
        try:
            await asyncio.wait_for(proc.wait(), limit_s)
        except TimeoutError:
            proc.kill()
            raise RuntimeError_(f"podman {args[0]} timed out") from None
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if proc.returncode != 0:
        raise RuntimeError_(f"podman {args[0]}: {err.decode(errors='replace').strip()[:500]}")
    return (out + err).decode(errors="replace") if merge else out.decode()


DEFAULT_IMAGE = "ghcr.io/ggml-org/llama.cpp:server"
CDI_SPECS = (Path("/etc/cdi/nvidia.yaml"), Path("/var/run/cdi/nvidia.yaml"))
DRI = Path("/dev/dri")


class PodmanRuntime(Runtime):
    kind = "podman"

    def __init__(self, image: str, flavour: str = "llama-server") -> None:
        self.image = image
        self.flavour = flavour

    @property
    def health_path(self) -> str:  # type: ignore[override]
        return "/health" if self.flavour == "llama-server" else "/v1/models"

    @staticmethod
    def name(model_id: str) -> str:
        """A container name for ``model_id``, distinct for distinct ids: Podman's names allow
        no ':', so '_' escapes (``_`` -> ``__``, ``:`` -> ``_-``)."""
        return PREFIX + "".join(_NAME_ESCAPES.get(char, char) for char in model_id)

    async def _uids_in_use(self) -> set[int]:
        out = await podman("ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.ID}}")
        ids = out.split()
        if not ids:
            return set()
        data = json.loads(await podman("inspect", *ids))
        used = set()
        for item in data:
            user = (item.get("Config") or {}).get("User") or ""
            if user.split(":")[0].isdigit():
                used.add(int(user.split(":")[0]))
        return used

    async def _pick_uid(self, model_id: str) -> int:
        used = await self._uids_in_use()
        span = UID_MAX - UID_MIN + 1
        start = int.from_bytes(model_id.encode()[:8].ljust(8, b"\0"), "big") % span
        for step in range(span):
            uid = UID_MIN + (start + step) % span
            if uid not in used:
                return uid
        raise RuntimeError_("no free UID left in 10000-65000")

    def _secret_payload(self, launch: Launch) -> tuple[bytes, list[str]]:
        secret = self.name(launch.model.id) + "-key"
        path = f"{SECRET_DIR}/{secret}"
        model_file = f"/models/{Path(launch.model.model_path).name}"
        if self.flavour == "llama-cpp-python":
            config = _python_server_config(launch)
            config["host"], config["port"] = "0.0.0.0", INNER_PORT  # noqa: S104 (inside the container)
            config["models"][0]["model"] = model_file  # type: ignore[index]
            return json.dumps(config).encode(), ["--config_file", path]
        args = launch.args
        command = [
            "-m", model_file,
            "--alias", launch.model.id,
            "--host", "0.0.0.0",  # noqa: S104 (inside the container; published on loopback)
            "--port", str(INNER_PORT),
            "-c", str(launch.total_context),
            "-np", str(launch.model.parallel),
            "-ngl", str(args.n_gpu_layers),
            "--api-key-file", path,
        ]  # fmt: skip
        if args.threads:
            command += ["-t", str(args.threads)]
        if args.jinja:
            command.append("--jinja")
        return launch.api_key.encode(), command

    def _gpu(self, launch: Launch) -> tuple[list[str], str]:
        """Device arguments and image: with layers offloaded, an NVIDIA GPU by CDI gets the
        CUDA variant of the default image, a /dev/dri GPU the Vulkan one (an image the
        operator chose is kept as it is)."""
        if launch.args.n_gpu_layers <= 0:
            return [], self.image
        variant = ""
        devices: list[str] = []
        if any(spec.exists() for spec in CDI_SPECS):
            devices, variant = ["--device", "nvidia.com/gpu=all"], "-cuda"
        elif DRI.exists():
            devices, variant = ["--device", str(DRI)], "-vulkan"
        image = self.image + variant if self.image == DEFAULT_IMAGE and variant else self.image
        return devices, image

    async def start(self, launch: Launch) -> Handle:
        name = self.name(launch.model.id)
        secret = name + "-key"
        await self._remove(name)
        # Podman will not hand a secret back: the control plane keeps its own copy of the key,
        # as for the process runtime, to adopt the container after a restart of its own.
        await asyncio.to_thread(write_private_file, launch.workdir / "api_key", launch.api_key)
        payload, command = self._secret_payload(launch)
        await podman("secret", "create", secret, "-", stdin=payload)
        uid = await self._pick_uid(launch.model.id)
        model_dir = str(Path(launch.model.model_path).parent)
        devices, image = self._gpu(launch)
        try:
            await podman(
                "run", "--detach",
                "--name", name,
                "--label", f"{LABEL}={launch.model.id}",
                "--label", f"{OWNER_LABEL}={launch.owner}",
                "--user", f"{uid}:{uid}",
                # The k8s-file log driver keeps everything otherwise (journald bounds itself).
                "--log-opt", f"max-size={LOG_MAX_BYTES}",
                "--cap-drop", "all",
                "--security-opt", "no-new-privileges",
                # No --read-only: Podman 4.3 cannot mount a secret into a read-only root.
                # The image's files belong to root, so the unprivileged UID cannot write them.
                "--publish", f"127.0.0.1:{launch.port}:{INNER_PORT}",
                "--volume", f"{model_dir}:/models:ro",
                "--secret", f"{secret},type=mount,mode=0400,uid={uid}",
                *devices,
                image,
                *command,
            )  # fmt: skip
        except RuntimeError_ as exc:
            await self._remove(name)
            # Podman binds the published port itself: taken since it was picked, it says so.
            if PORT_TAKEN.search(str(exc)):
                raise PortTaken(str(exc)) from None
            raise
        return Handle(container=name)

    async def _remove(self, name: str, grace_s: float = STOP_GRACE_S) -> None:
        removals = (
            ("rm", "--force", "--time", str(int(grace_s)), name),
            ("secret", "rm", name + "-key"),
        )
        for args in removals:
            with contextlib.suppress(RuntimeError_):  # not there
                await podman(*args)

    async def stop(self, handle: Handle, *, grace_s: float = STOP_GRACE_S) -> None:
        if handle.container:
            await self._remove(handle.container, grace_s)

    async def alive(self, handle: Handle) -> bool:
        if not handle.container:
            return False
        try:
            out = await podman("inspect", "--format", "{{.State.Running}}", handle.container)
        except RuntimeError_:
            return False
        return out.strip() == "true"

    async def logs(self, handle: Handle, workdir: Path, tail: int) -> str:
        if not handle.container:
            return ""
        try:
            return await podman("logs", "--tail", str(tail), handle.container, merge=True)
        except RuntimeError_ as exc:
            return str(exc)

    async def orphans(self, known: set[str], owner: str) -> list[Handle]:
        template = '{{.Names}} {{index .Labels "' + OWNER_LABEL + '"}}'
        try:
            out = await podman("ps", "-a", "--filter", f"label={LABEL}", "--format", template)
        except RuntimeError_:
            return []
        found = []
        for line in out.splitlines():
            name, _, label = line.strip().partition(" ")
            if name and name not in known and label.strip() in ("", owner):
                found.append(Handle(container=name))
        return found


def podman_available() -> bool:
    return any(
        os.access(os.path.join(d, "podman"), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep)
    )
