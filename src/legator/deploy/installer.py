"""Install, update, apply and remove deployments on this host, with rollback.

Order of an apply: validate and collect secrets (nothing has changed yet, so any failure here
leaves the host as it was) -> back up files and volumes -> stop the affected services -> swap
the files -> create the Podman secrets -> reload systemd -> start -> health check. A failure
after the backup rolls the files, volumes and secrets back and starts the previous services
again. A replaced secret gets its previous value back from leger's sealed copy (``sealed``):
Podman 4.3 cannot show a stored value.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Concatenate, ParamSpec, TypeVar

from legator.core.security import random_hex, write_private_file
from legator.deploy.backups import DEFAULT_KEEP_BACKUPS, BackupInfo, Backups
from legator.deploy.diff import affected_services, changed_files
from legator.deploy.layout import Layout
from legator.deploy.lock import DEFAULT_TIMEOUT, state_lock
from legator.deploy.manifest import Manifest
from legator.deploy.podman import Podman, PodmanError
from legator.deploy.quadlet.check import Report, validate_dir
from legator.deploy.quadlet.conflicts import find_conflicts, published_ports, volume_name
from legator.deploy.quadlet.parse import Unit, parse_unit
from legator.deploy.quadlet.validate import secret_name
from legator.deploy.sealed import SealedSecrets, SealError
from legator.deploy.secrets_source import SecretSource
from legator.deploy.sources import Fetched
from legator.deploy.staging import Staged, clear_leftovers, discard, stage, swap_in
from legator.deploy.staging import load as load_staged
from legator.deploy.state import Deployment, Deployments, check_name, now
from legator.deploy.systemd import Systemd, SystemdError

Progress = Callable[[str], None]
P = ParamSpec("P")
R = TypeVar("R")


class DeployError(RuntimeError):
    """The operation was refused before anything changed."""


class ConflictError(DeployError):
    pass


class RolledBack(RuntimeError):
    """The new version failed and the previous one was restored."""

    def __init__(self, message: str, backup: BackupInfo | None) -> None:
        super().__init__(message)
        self.backup = backup


@dataclass
class Options:
    start: bool = True
    force: bool = False
    secrets: bool = True
    dry_run: bool = False
    health_timeout: float = 30.0
    keep_backups: int = DEFAULT_KEEP_BACKUPS  # automatic backups kept per deployment; 0: all


@dataclass
class Plan:
    name: str
    version: int
    add: list[str] = field(default_factory=list)
    change: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    start: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Before:
    volumes: set[str]  # of the new set, existing before the apply
    secrets: dict[str, str]  # all Podman secrets before the apply: name -> ID
    wanted_secrets: set[str]  # the ones the new version needs


@dataclass
class Result:
    plan: Plan
    backup: BackupInfo | None
    states: dict[str, str]
    applied: bool
    pruned: list[str] = field(default_factory=list)  # automatic backups deleted after it


def locked(
    operation: Callable[Concatenate[Deployer, P], R],
) -> Callable[Concatenate[Deployer, P], R]:
    """Run ``operation`` (a ``Deployer`` method, or a function taking the deployer first)
    holding leger's state lock; see ``Deployer.hold_lock``."""

    @functools.wraps(operation)
    def run_locked(deployer: Deployer, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with deployer.hold_lock():
            return operation(deployer, *args, **kwargs)

    return run_locked


# SIGHUP: the terminal went away (an ssh session dropped) and the kernel hung up the
# foreground process group; by default that killed leger half-way through an apply.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_VERBS = {signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}


def _hold_off_signals() -> None:
    """Ignore SIGTERM, SIGINT and SIGHUP until the operation holding the lock is over: a
    rollback cut short by a second signal (an impatient Ctrl-C, a service manager stopping
    leger again) left the files, secrets and services of neither version. SIG_IGN rather than
    a handler: the systemctl and podman children started meanwhile inherit it, so a Ctrl-C or
    a hang-up sent to the whole process group does not kill the rollback's own steps either."""
    if threading.current_thread() is threading.main_thread():
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _let_go_of_a_lost_terminal() -> None:
    """Point stdin, stdout and stderr at /dev/null where they were a terminal that hung up
    (a character device that is no longer a tty): every write there fails with EIO, and the
    progress display or the final message failing that way ended a finished rollback with a
    traceback and exit 1 instead of 5. Pipes, files and a terminal still there are kept."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            try:
                lost = stat.S_ISCHR(os.fstat(fd).st_mode) and not os.isatty(fd)
            except OSError:
                continue
            if lost:
                os.dup2(null, fd)
    finally:
        os.close(null)


@contextmanager
def _signals_interrupt_once() -> Iterator[None]:
    """SIGTERM (``kill PID``, a service manager stopping leger) and SIGHUP (the terminal is
    lost) interrupt like Ctrl-C, so an apply rolls back instead of dying with the new files
    installed under the old record. Only the first of them interrupts; later ones are ignored
    (``_hold_off_signals``) until the body is over. Only the main thread receives signals;
    elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        _hold_off_signals()
        if signum == signal.SIGHUP:
            _let_go_of_a_lost_terminal()
        verb = _VERBS.get(signal.Signals(signum), "interrupted")
        raise KeyboardInterrupt(f"{verb} by signal {signum}")

    previous = {signum: signal.signal(signum, interrupt) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Deferred:
    """The first stop signal that arrived once an apply had succeeded, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def message(self) -> str:
        verb = _VERBS.get(signal.Signals(self.signum or signal.SIGINT), "interrupted")
        return f"{verb} by signal {self.signum}"


def _defer_signals() -> _Deferred:
    """From the moment an apply has succeeded until the lock is released (``hold_lock`` puts
    the handlers back), SIGTERM, SIGINT and SIGHUP no longer interrupt: there is nothing left
    to roll back, and recording the new version must not be cut short. The first one is
    noted instead, so that the prune stops early and the apply still ends as applied."""
    deferred = _Deferred()
    if threading.current_thread() is not threading.main_thread():
        return deferred

    def note(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            _let_go_of_a_lost_terminal()
        if deferred.signum is None:
            deferred.signum = signum

    for signum in _STOP_SIGNALS:
        signal.signal(signum, note)
    return deferred


def _units(files: dict[str, bytes]) -> list[Unit]:
    return [parse_unit(name, data.decode()) for name, data in sorted(files.items())]


def service_units(files: dict[str, bytes], order: list[str]) -> list[str]:
    """Container services in manifest order (dependencies first), then any others."""
    containers = {u.stem: u.service_name for u in _units(files) if u.suffix == ".container"}
    ordered = [containers[name] for name in order if name in containers]
    return ordered + sorted(set(containers.values()) - set(ordered))


def volume_names(files: dict[str, bytes]) -> list[str]:
    return sorted(volume_name(u) for u in _units(files) if u.suffix == ".volume")


def network_names(files: dict[str, bytes]) -> list[str]:
    return sorted(
        u.get("Network", "NetworkName") or f"systemd-{u.stem}"
        for u in _units(files)
        if u.suffix == ".network"
    )


def host_ports(files: dict[str, bytes]) -> list[int]:
    return sorted({spec.host for unit in _units(files) for spec in published_ports(unit)})


def secret_users(files: dict[str, bytes], secrets: set[str]) -> list[str]:
    """The container services whose ``Secret=`` lines name one of ``secrets``."""
    return sorted(
        unit.service_name
        for unit in _units(files)
        if unit.suffix == ".container"
        and any(secret_name(v) in secrets for v in unit.values("Container", "Secret"))
    )


class Deployer:
    def __init__(
        self,
        layout: Layout,
        secrets: SecretSource,
        *,
        podman: Podman | None = None,
        systemd: Systemd | None = None,
        progress: Progress = lambda _step: None,
        lock_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.layout = layout
        self.secrets = secrets
        self.podman = podman or Podman()
        self.systemd = systemd or Systemd(system=layout.system)
        self.progress = progress
        self.lock_timeout = lock_timeout
        self._lock_depth = 0  # the lock is re-entrant within one Deployer (one thread)
        self.deployments = Deployments(layout.deployments)
        self.backups = Backups(layout.backups, self.podman)
        self.sealed = SealedSecrets(layout.state)
        layout.ensure()

    @contextmanager
    def hold_lock(self) -> Iterator[None]:
        """Hold leger's state lock: apply, remove and restore run one at a time per host and
        scope, so two of them never interleave their changes to files, Podman and
        ``deployments.json``. A second one waits up to ``lock_timeout`` seconds. While it is
        held, SIGTERM interrupts like Ctrl-C (an apply rolls back), once."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with (
            state_lock(
                self.layout.state,
                timeout=self.lock_timeout,
                waiting=lambda: self.progress("waiting for another leger operation"),
            ),
            _signals_interrupt_once(),
        ):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    # ----- reading the current state ---------------------------------------------------------

    def active_files(self, name: str) -> dict[str, bytes]:
        directory = self.layout.active / name
        if not directory.exists():
            return {}
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}

    def _secret_mac(self, value: bytes) -> str:
        key_path = self.layout.state / ".secret-mac-key"
        if not key_path.exists():
            write_private_file(key_path, random_hex(32))
        return hmac.new(key_path.read_bytes(), value, hashlib.sha256).hexdigest()

    def _applying(self, name: str) -> Path:
        """Present from the backup of an apply of ``name`` until it is recorded or rolled
        back, and from the start of a restore until it is recorded: found by a later
        operation, it means that apply or restore was killed half-way."""
        return self.layout.state / f".applying-{name}"

    def _mark_applying(self, name: str, backup_id: str) -> None:
        """``backup_id``: the backup whose restore puts back a known state."""
        write_private_file(self._applying(name), json.dumps({"backup": backup_id}))

    def _check_not_interrupted(self, name: str) -> None:
        try:
            backup = json.loads(self._applying(name).read_text())["backup"]
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            backup = "(see `leger backup list`)"
        raise DeployError(
            f"an earlier apply or restore of {name} was interrupted and may have left its "
            f"files half installed: run `leger backup restore {backup}` to put a complete "
            "version back, then try again"
        )

    # ----- checks done before anything changes -------------------------------------------

    def validate(self, directory: Path) -> Report:
        return validate_dir(directory, user=not self.layout.system)

    def plan(
        self,
        name: str,
        manifest: Manifest,
        files: dict[str, bytes],
        opts: Options,
        values: dict[str, bytes] | None = None,
    ) -> Plan:
        """What an apply would do. ``values`` (the secrets read for it): a running service
        whose secret gets a new value is restarted, because a container reads its secrets
        only when it starts."""
        check_name(name)
        current = self.deployments.get(name)
        old = self.active_files(name)
        changed = changed_files(old, files)
        plan = Plan(name=name, version=manifest.version)
        plan.add = [f for f in changed if f not in old]
        plan.change = [f for f in changed if f in old and f in files]
        plan.remove = [f for f in changed if f not in files]
        touched = set(affected_services(changed))
        old_units = service_units(old, current.services if current else [])
        restart = set(secret_users(old, self._changed_secrets(values or {}, current)))
        plan.stop = [u for u in old_units if u.removesuffix(".service") in touched or u in restart]
        plan.start = service_units(files, manifest.services) if opts.start else []
        plan.secrets = [] if not opts.secrets else list(manifest.secrets_required)
        self._check_ownership(name, files, opts, plan)
        self._check_conflicts(name, files, opts, plan)
        return plan

    def _check_ownership(
        self, name: str, files: dict[str, bytes], opts: Options, plan: Plan
    ) -> None:
        owners = {
            f: other.name
            for other in self.deployments.load().values()
            if other.name != name
            for f in other.files
        }
        mine = set(self.active_files(name))
        for path in files:
            if path in owners:
                message = f"{path} belongs to deployment {owners[path]!r}"
                if not opts.force:
                    raise ConflictError(message + " (remove it, or use --force)")
                plan.warnings.append(message + "; --force takes it over")
            elif path not in mine and (self.layout.quadlets / path).exists():
                message = f"{self.layout.quadlets / path} exists and is not managed by leger"
                if not opts.force:
                    raise ConflictError(message + " (move it away, or use --force)")
                plan.warnings.append(message + "; --force replaces it")

    def _check_conflicts(
        self, name: str, files: dict[str, bytes], opts: Options, plan: Plan
    ) -> None:
        others = self.deployments.load()
        units = _units(files)
        for other in others.values():
            if other.name != name:
                units += _units(self.active_files(other.name))
        own_ports = {port for item in others.values() for port in item.ports}
        findings = [f for f in find_conflicts(units, own_ports=own_ports) if f.level == "error"]
        if findings:
            text = "; ".join(str(f) for f in findings)
            if not opts.force:
                raise ConflictError(f"conflicts: {text}")
            plan.warnings.append(f"conflicts ignored with --force: {text}")

    def _changed_secrets(self, values: dict[str, bytes], current: Deployment | None) -> set[str]:
        """The secrets an apply replaces: those the deployment's record holds another value
        for (a secret it has no record of is replaced too; see ``_install_secrets``)."""
        known = current.secrets if current else {}
        return {s for s, value in values.items() if known.get(s) != self._secret_mac(value)}

    def collect_secrets(self, manifest: Manifest, opts: Options) -> dict[str, bytes]:
        if not opts.secrets:
            return {}
        # Raises MissingSecret naming the first one absent, before anything has changed.
        return {name: self.secrets.get(name) for name in manifest.secrets_required}

    # ----- apply ------------------------------------------------------------------------------

    @locked
    def apply(
        self,
        name: str,
        manifest: Manifest,
        files: dict[str, bytes],
        source: str,
        staged_dir: Path,
        opts: Options,
    ) -> Result:
        check_name(name)
        self._check_not_interrupted(name)
        self.progress("validating")
        report = self.validate(staged_dir)
        if not report.ok:
            errors = "; ".join(str(f) for f in report.findings if f.level == "error")
            raise DeployError(f"validation failed: {errors}")
        values = self.collect_secrets(manifest, opts)
        plan = self.plan(name, manifest, files, opts, values)
        if opts.dry_run:
            return Result(plan, None, {}, applied=False)

        current = self.deployments.get(name)
        old_files = self.active_files(name)
        old_volumes = current.volumes if current else []
        if values:
            try:
                self.sealed.check()  # a bad key file stops here, before any change
            except SealError as exc:
                raise DeployError(str(exc)) from None
        # What existed before, so a rollback removes only what this attempt created.
        before = _Before(
            volumes=set(self.podman.volumes_existing(volume_names(files))),
            secrets=self.podman.secret_ids() if values else {},
            wanted_secrets=set(values),
        )
        self.progress("backing up")
        backup = self.backups.create(
            name,
            current.version if current else -1,
            old_files,
            old_volumes,
            reason=f"before applying version {manifest.version}",
            automatic=True,
        )
        self._mark_applying(name, backup.id)
        replaced: dict[str, bytes | None] = {}  # secret -> its earlier value (None: unknown)
        try:
            self.progress("stopping affected services")
            self.systemd.stop(list(reversed(plan.stop)))
            self.progress("installing files")
            self._swap(name, old_files, files)
            macs = self._install_secrets(values, current, before.secrets, replaced)
            self.systemd.daemon_reload()
            states: dict[str, str] = {}
            if plan.start:
                self.progress("starting services")
                self.systemd.start(plan.start)
                self.progress("checking health")
                states = self.systemd.wait_healthy(plan.start, opts.health_timeout)
                unhealthy = {u: s for u, s in states.items() if s != "active"}
                if unhealthy:
                    detail = ", ".join(f"{u} is {s}" for u, s in unhealthy.items())
                    raise SystemdError(f"health check failed: {detail}")
            deferred = _defer_signals()  # applied: a signal from here on no longer rolls back
        except (SystemdError, PodmanError, OSError, KeyboardInterrupt) as exc:
            _hold_off_signals()
            self.progress("rolling back")
            try:
                self._rollback(name, files, old_files, backup, current, before, replaced, values)
            except (SystemdError, PodmanError, OSError) as again:
                raise DeployError(
                    f"{exc}; the rollback failed too ({again}): restore by hand with "
                    f"`leger backup restore {backup.id}`"
                ) from again
            self._applying(name).unlink(missing_ok=True)
            kept = ""
            if back := sorted(s for s, old in replaced.items() if old is not None):
                kept += f"; secrets {', '.join(back)} have their previous value again"
            if unknown := sorted(s for s, old in replaced.items() if old is None):
                kept += (
                    f"; secrets {', '.join(unknown)} keep their new value (they were not "
                    "created by leger, so it holds no copy of the old one) and the previous "
                    "services were restarted with it"
                )
            raise RolledBack(
                f"{exc}; rolled back to the previous state (backup {backup.id}){kept}", backup
            ) from exc
        stamp = now()
        self.deployments.put(
            Deployment(
                name=name,
                version=manifest.version,
                source=source,
                installed_at=current.installed_at if current else stamp,
                updated_at=stamp,
                files=sorted(files),
                services=service_units(files, manifest.services),
                volumes=volume_names(files),
                ports=host_ports(files),
                secrets=macs,
                started=opts.start,
            )
        )
        self._applying(name).unlink(missing_ok=True)
        versions = {manifest.version, backup.version}
        pruned = self._prune_backups(name, opts.keep_backups, versions, plan, deferred)
        return Result(plan, backup, states, applied=True, pruned=pruned)

    def _prune_backups(
        self, name: str, keep: int, versions: set[int], plan: Plan, deferred: _Deferred
    ) -> list[str]:
        """The apply has succeeded and is recorded: a failure to prune only warns, and so
        does a stop signal, which ends the prune after the backup being deleted."""
        self.progress("pruning old backups")
        try:
            pruned = [b.id for b in self.backups.prune(name, keep, protect=versions, stop=deferred)]
        except OSError as exc:
            plan.warnings.append(f"old backups were not pruned: {exc}")
            return []
        if deferred():
            plan.warnings.append(
                f"{deferred.message()} while pruning old backups: the apply stands; the "
                f"next apply or `leger backup prune {name}` prunes the rest"
            )
        return pruned

    def clear_leftovers(self) -> None:
        """Remove the temporary trees of a ``staged stage`` or ``install`` killed half-way.
        Call holding the state lock: every writer of ``staged/`` and ``.incoming/`` holds it
        while it writes, so none of them belongs to a live process."""
        clear_leftovers(self.layout.staged)
        shutil.rmtree(self.incoming, ignore_errors=True)

    @property
    def incoming(self) -> Path:
        """Where ``install`` writes the fetched files before applying them."""
        return self.layout.state / ".incoming"

    def _swap(self, name: str, old: dict[str, bytes], new: dict[str, bytes]) -> None:
        active = self.layout.active / name
        tmp = self.layout.active / f".{name}.new"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        for path, data in new.items():
            (tmp / path).write_bytes(data)
        swap_in(tmp, active)
        for path in set(old) - set(new):
            (self.layout.quadlets / path).unlink(missing_ok=True)
        for path, data in new.items():
            target = self.layout.quadlets / path
            partial = target.with_name(f".{path}.tmp")
            partial.write_bytes(data)
            partial.replace(target)

    def _install_secrets(
        self,
        values: dict[str, bytes],
        current: Deployment | None,
        existing: dict[str, str],
        replaced: dict[str, bytes | None],
    ) -> dict[str, str]:
        """Create each missing secret and replace each whose value changed (compared by HMAC:
        Podman 4.3 cannot show a stored value). Independent Podman calls run in parallel.
        ``existing``: Podman's secrets before (name -> ID). ``replaced`` receives each secret
        whose earlier value was removed, with that value from leger's sealed copy (None when
        leger did not create the secret it replaced). Afterwards the sealed copies describe
        every secret in ``values``, the ones kept as they were included."""
        if not values:
            return {}  # and ``existing`` was not listed: the copies stay as they are
        known = current.secrets if current else {}
        macs = {secret: self._secret_mac(value) for secret, value in values.items()}
        todo = [s for s in values if s not in existing or known.get(s) != macs[s]]
        ids = {s: existing[s] for s in values if s in existing}

        def put(secret: str) -> None:
            if secret in existing:
                replaced[secret] = self.sealed.get(secret, existing[secret])
                self.podman.secret_remove(secret)
            ids[secret] = self.podman.secret_create(secret, values[secret])

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(put, todo))
        self.sealed.put({s: (ids[s], value) for s, value in values.items()})
        self.sealed.prune({**existing, **ids})
        return macs

    def _rollback(
        self,
        name: str,
        new_files: dict[str, bytes],
        old_files: dict[str, bytes],
        backup: BackupInfo,
        previous: Deployment | None,
        before: _Before,
        replaced: dict[str, bytes | None],
        values: dict[str, bytes],
    ) -> None:
        """Undo a failed apply. A replaced secret gets its previous value back from leger's
        sealed copy. Without one (a secret leger did not create) the previous services start
        again with the new value (each was stopped: ``plan`` restarts the users of a changed
        secret) and the record says which value is stored."""
        new_units = service_units(new_files, [])
        self.systemd.stop(list(reversed(new_units)))
        self._swap(name, new_files, old_files)
        if not old_files:
            shutil.rmtree(self.layout.active / name, ignore_errors=True)
        self.backups.restore_volumes(backup.id)
        for volume in set(volume_names(new_files)) - before.volumes - set(backup.volumes):
            self.podman.volume_remove(volume)
        kept = set(previous.secrets) if previous else set()
        created = before.wanted_secrets - set(before.secrets) - kept
        for secret in created:
            self.podman.secret_remove(secret)
        self.sealed.drop(created)
        restored: dict[str, tuple[str, bytes]] = {}
        for secret, old in sorted(replaced.items()):
            if old is not None:
                self.podman.secret_remove(secret)
                restored[secret] = (self.podman.secret_create(secret, old), old)
        self.sealed.put(restored)
        self.systemd.daemon_reload()
        unknown = {s for s, old in replaced.items() if old is None}
        if previous and unknown:
            macs = {s: self._secret_mac(values[s]) for s in unknown if s in previous.secrets}
            self.deployments.put(
                previous.model_copy(update={"secrets": {**previous.secrets, **macs}})
            )
        if previous and previous.started and previous.services:
            self.systemd.start(previous.services)

    # ----- other operations ------------------------------------------------------------------

    @locked
    def remove(self, name: str, *, remove_volumes: bool, backup_volumes: bool) -> BackupInfo | None:
        current = self.deployments.get(name)
        if current is None:
            raise DeployError(f"no deployment {name!r}")
        backup = None
        if backup_volumes:
            self.progress("backing up")
            backup = self.backups.create(
                name,
                current.version,
                self.active_files(name),
                current.volumes,
                reason="before remove",
                automatic=False,
            )
        self.progress("stopping services")
        self.systemd.stop(list(reversed(current.services)))
        active = self.active_files(name)
        networks = network_names(active)
        # The active files too: an apply killed half-way installed files the record lacks.
        for path in set(current.files) | set(active):
            (self.layout.quadlets / path).unlink(missing_ok=True)
        shutil.rmtree(self.layout.active / name, ignore_errors=True)
        self.systemd.daemon_reload()
        self._forget(current, networks)
        self._applying(name).unlink(missing_ok=True)
        if remove_volumes or backup_volumes:
            for volume in current.volumes:
                self.podman.volume_remove(volume)
        return backup

    def _forget(self, current: Deployment, networks: list[str]) -> None:
        """Remove the secrets and networks only ``current`` used, then its record."""
        still_used = {
            s
            for other in self.deployments.load().values()
            if other.name != current.name
            for s in other.secrets
        }
        gone = [secret for secret in current.secrets if secret not in still_used]
        for secret in gone:
            self.podman.secret_remove(secret)
        self.sealed.drop(gone)
        for network in networks:
            self.podman.network_remove(network)  # refused by Podman while another uses it
        self.deployments.remove(current.name)

    @locked
    def restore(self, backup_id: str) -> BackupInfo:
        """Put a backup's files and volumes back and restart its services. The backup taken
        before a first install (version -1, no files) removes the deployment, as
        ``remove`` does with its volumes kept."""
        info = self.backups.info(backup_id)
        current = self.deployments.get(info.deployment)
        files = self.backups.files(backup_id)
        old_files = self.active_files(info.deployment)
        # Killed before it has recorded what it put back, the files would not match the
        # record: the next apply is refused, pointing at this backup.
        self._mark_applying(info.deployment, backup_id)
        # Every service of the active files: an apply killed half-way may have started some
        # that the record does not list.
        running = service_units(old_files, current.services if current else [])
        self.systemd.stop(list(reversed(running)))
        self._swap(info.deployment, old_files, files)
        self.backups.restore_volumes(backup_id)
        if not files:
            shutil.rmtree(self.layout.active / info.deployment, ignore_errors=True)
        self.systemd.daemon_reload()
        if not files and current:
            self._forget(current, network_names(old_files))
        if files:
            services = service_units(files, current.services if current else [])
            stamp = now()
            self.deployments.put(
                Deployment(
                    name=info.deployment,
                    version=info.version,
                    source=current.source if current else f"backup:{backup_id}",
                    installed_at=current.installed_at if current else stamp,
                    updated_at=stamp,
                    files=sorted(files),
                    services=services,
                    volumes=volume_names(files),
                    ports=host_ports(files),
                    secrets=current.secrets if current else {},
                )
            )
        self._applying(info.deployment).unlink(missing_ok=True)  # files and record agree
        if files:
            self.systemd.start(services)
        return info


@locked
def install(deployer: Deployer, name: str, fetched: Fetched, source: str, opts: Options) -> Result:
    """Write the fetched files to a private incoming directory (checksums verified), then apply
    them. Used by ``deploy install`` and ``deploy update``; ``staged apply`` uses staged/."""
    deployer.clear_leftovers()
    staged = stage(deployer.incoming, name, fetched)
    try:
        return deployer.apply(name, staged.manifest, staged.files(), source, staged.directory, opts)
    finally:
        shutil.rmtree(staged.directory, ignore_errors=True)


@locked
def stage_update(deployer: Deployer, name: str, fetched: Fetched) -> Staged:
    """Write ``staged/NAME`` holding the lock (the download is done before): a ``staged apply``
    running meanwhile would otherwise discard this newer update when it finishes."""
    deployer.clear_leftovers()
    return stage(deployer.layout.staged, name, fetched)


@locked
def discard_staged(deployer: Deployer, name: str) -> None:
    """Throw ``staged/NAME`` away, never while a ``staged apply`` is applying it."""
    discard(deployer.layout.staged, name)


@locked
def apply_staged(
    deployer: Deployer,
    name: str,
    *,
    force: bool,
    health_timeout: float,
    keep_backups: int = DEFAULT_KEEP_BACKUPS,
) -> Result:
    """Apply ``staged/NAME`` and discard it once applied (kept when the apply fails)."""
    staged = load_staged(deployer.layout.staged, name)
    current = deployer.deployments.get(name)
    opts = Options(
        start=current.started if current else True,
        force=force,
        health_timeout=health_timeout,
        keep_backups=keep_backups,
    )
    result = deployer.apply(
        name, staged.manifest, staged.files(), staged.source, staged.directory, opts
    )
    discard(deployer.layout.staged, name)
    return result
