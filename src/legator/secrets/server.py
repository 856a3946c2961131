"""Running legerd: open the store, bind the TCP listener and the unix socket, serve both from
one uvicorn server, and hand each unix-socket request the peer's credentials."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from legator.core.auth.tailscale import WhoIs
from legator.core.logging import get_logger
from legator.secrets.acl import AclError, Policy
from legator.secrets.api import PEER_STATE_KEY, Identifier, create_legerd_app
from legator.secrets.audit import AuditLog, AuditRotation
from legator.secrets.crypto import load_kek
from legator.secrets.errors import KekError
from legator.secrets.identity import is_loopback, peer_credentials
from legator.secrets.quota import Quota
from legator.secrets.ratelimit import Limiter, RateLimit
from legator.secrets.service import SecretsService
from legator.secrets.store import SecretStore

T = TypeVar("T")

log = get_logger("legerd")
DEFAULT_STATE_DIR = Path("/var/lib/legerd")
DEFAULT_ACL = Path("/etc/legerd/acl.json")
DEFAULT_SOCKET = Path("/run/legerd/legerd.sock")
DEFAULT_TAILSCALE_SOCKET = Path("/var/run/tailscale/tailscaled.sock")


class PeerCredProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus SO_PEERCRED for unix-socket connections.

    ASGI has no field for peer credentials, so they travel in the per-connection copy of the
    lifespan state that uvicorn puts in every request's ``scope["state"]``.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        cred = peer_credentials(sock)
        if cred is not None:
            self.app_state = {**self.app_state, PEER_STATE_KEY: cred}
        elif sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Without it a response written in two parts waits for the client's delayed ACK
            # (40 ms) on sockets handed to uvicorn pre-bound.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


@dataclass
class LegerdConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    listen: str | None = None
    socket_path: Path | None = DEFAULT_SOCKET
    dev: bool = False
    acl_path: Path | None = None
    tailscale_socket: Path | None = DEFAULT_TAILSCALE_SOCKET
    # Host names TCP callers may reach legerd by, besides IP literals and localhost (a page
    # whose DNS was rebound to legerd's address sends its own name); empty: any.
    allowed_hosts: tuple[str, ...] = ()
    # Storage quotas; None: from the LEGERD_MAX_* environment, else the defaults.
    quota: Quota | None = None
    # Calls per second per source; None: from LEGERD_RATE_LIMIT/_BURST, else the defaults.
    rate_limit: RateLimit | None = None
    # Audit log rotation; None: from LEGERD_AUDIT_MAX_BYTES/_KEEP, else the defaults.
    audit_rotation: AuditRotation | None = None

    @property
    def db_path(self) -> Path:
        return self.state_dir / "secrets.db"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "keys" / "main.key"

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.log"


@contextmanager
def rotation_lock(config: LegerdConfig) -> Iterator[None]:
    """Held for a whole ``rotate-kek``: two at once could each drop the wrapping of the data
    key that the other has just added and written to the key file."""
    # A file of its own: closing any descriptor of secrets.db would drop SQLite's locks on it.
    fd = os.open(config.state_dir / "rotate-kek.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KekError(
                f"another `legerd rotate-kek` is running on {config.state_dir}; "
                "let it finish, then run this one again if still needed"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


class ConfigProblem(ValueError):
    pass


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigProblem(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8573")
    return host.strip("[]") or "0.0.0.0", int(port_text)  # noqa: S104 - explicit ':PORT'


def validate(config: LegerdConfig) -> None:
    if config.listen is None and config.socket_path is None:
        raise ConfigProblem("nothing to serve: give --listen and/or --socket")
    if config.dev and config.listen is not None:
        host, _ = parse_listen(config.listen)
        if not is_loopback(host):
            raise ConfigProblem(
                f"--dev grants everything to local callers, so it listens on loopback only; "
                f"--listen {config.listen} is not a loopback address"
            )
    if config.listen is not None:
        parse_listen(config.listen)
    for name in config.allowed_hosts:
        if not name or any(c in name for c in ":/[] "):
            raise ConfigProblem(
                f"allowed host {name!r}: expected a host name without scheme or port, "
                "e.g. legerd.example.ts.net"
            )
    if config.socket_path is not None and socket_is_served(config.socket_path):
        # Unlinking it would leave that process running, unreachable, its callers sent here.
        raise ConfigProblem(
            f"--socket {config.socket_path}: another process is already serving on it; "
            "stop it or give another --socket"
        )


def socket_is_served(path: Path) -> bool:
    """Whether something accepts connections on the unix socket at ``path`` (a socket file
    that refuses them is what a killed process leaves behind)."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def setting(given: T | None, from_env: Callable[[], T]) -> T:
    """``given`` (a test's or an embedder's), else read from the environment, where a bad
    value is a ConfigProblem naming the variable."""
    if given is not None:
        return given
    try:
        return from_env()
    except ValueError as exc:
        raise ConfigProblem(str(exc)) from None


def open_service(config: LegerdConfig) -> tuple[SecretsService, AuditLog]:
    # A bad setting stops start-up before the store is touched.
    quota = setting(config.quota, Quota.from_env)
    rotation = setting(config.audit_rotation, AuditRotation.from_env)
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    kek = load_kek(config.key_file)
    store = SecretStore(config.db_path, kek)
    audit = AuditLog(config.audit_path, rotation=rotation)
    return SecretsService(store, audit, quota), audit


def bind_sockets(config: LegerdConfig) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    if config.listen is not None:
        host, port = parse_listen(config.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, port))
        sockets.append(tcp)
    if config.socket_path is not None:
        path = config.socket_path
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
            # Every local user is to reach the socket: not 0700, as `serve`'s umask would make it.
            path.parent.chmod(0o755)
        if path.is_socket():
            path.unlink()
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(str(path))
        # Anyone local may connect: each caller is identified by its uid and the ACL decides.
        os.chmod(path, 0o666)  # noqa: S103
        sockets.append(unix)
    for sock in sockets:
        sock.listen(1024)
        sock.set_inheritable(True)
    return sockets


def build_identifier(config: LegerdConfig) -> Identifier:
    whois = None
    if config.tailscale_socket is not None and not config.dev:
        whois = WhoIs(config.tailscale_socket)
    return Identifier(Policy.load(config.acl_path), whois, config.dev)


class Legerd:
    """One legerd instance: the store opened, the sockets bound, uvicorn ready to serve."""

    def __init__(self, config: LegerdConfig, *, log_level: str = "warning") -> None:
        validate(config)
        limiter = Limiter(setting(config.rate_limit, partial(RateLimit.from_env, dev=config.dev)))
        self.identifier = build_identifier(config)  # a bad policy file fails before anything
        self.config = config
        self.service, self.audit = open_service(config)
        self.sockets = bind_sockets(config)
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_legerd_app(
                    self.service,
                    self.identifier,
                    frozenset(name.lower().rstrip(".") for name in config.allowed_hosts),
                    limiter,
                ),
                http=PeerCredProtocol,
                lifespan="off",
                log_config=None,
                log_level=log_level,
                access_log=False,
                server_header=False,
                # Callers are identified by the address they connect from: an
                # X-Forwarded-For from loopback (uvicorn's default trust) would let any local
                # user name the tailnet node tailscaled is asked about.
                proxy_headers=False,
            )
        )

    def reload_policy(self) -> bool:
        """Re-read the policy file (on SIGHUP). A bad file keeps the rules in force."""
        try:
            self.identifier.policy = Policy.load(self.config.acl_path)
        except AclError as exc:
            log.error("policy reload failed; keeping the previous rules", error=str(exc))
            return False
        log.warning("policy reloaded", path=str(self.config.acl_path))
        return True

    def reopen_audit_log(self) -> None:
        """Go on in a new audit.log (on SIGHUP, after logrotate renamed it away)."""
        try:
            self.audit.reopen()
        except OSError as exc:
            log.error("audit log reopen failed; writing on in the current file", error=str(exc))

    def reload(self) -> None:
        self.reload_policy()
        self.reopen_audit_log()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.server.serve(sockets=self.sockets)

    def run(self) -> None:
        if threading.current_thread() is threading.main_thread():
            # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, to whatever handler
            # was there before; this one lets close() flush the audit log and remove the socket.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        try:
            asyncio.run(self.serve())
        finally:
            self.close()

    def stop(self) -> None:
        self.server.should_exit = True

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        path = self.config.socket_path
        if path is not None and path.is_socket():
            path.unlink()
        self.audit.close()
        self.service.store.close()


def serve(config: LegerdConfig, *, log_level: str = "warning") -> None:
    os.umask(0o077)  # database, WAL, key and log: owner only
    Legerd(config, log_level=log_level).run()
