"""What every leger command group shares: scope, the deployer, progress and exit codes."""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from legator.cli.common import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    err_console,
    fail,
    validation_message,
)
from legator.deploy.backups import BackupError
from legator.deploy.client import (
    ControlPlaneError,
    RemoteConflict,
    RemoteNotFound,
    RemoteRejected,
    load_login,
)
from legator.deploy.installer import ConflictError, Deployer, DeployError, RolledBack
from legator.deploy.layout import Layout, layout
from legator.deploy.lock import DEFAULT_TIMEOUT, LockTimeout
from legator.deploy.manifest import ChecksumMismatch
from legator.deploy.podman import PodmanError
from legator.deploy.quadlet.parse import ParseError
from legator.deploy.secrets_source import MissingSecret, default_source
from legator.deploy.sources import SourceError
from legator.deploy.staging import StagingError
from legator.deploy.systemd import SystemdError

T = TypeVar("T")
EXIT_ROLLED_BACK = 5

SYSTEM_OPTION = typer.Option(
    False, "--system", help="System scope: /etc/containers/systemd and /var/lib/leger."
)
JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


def scope(system: bool) -> Layout:
    return layout(system)


def deployer(system: bool, progress: Callable[[str], None] = lambda _s: None) -> Deployer:
    where = scope(system)
    login = load_login(where.auth_file)
    # legerd's namespace is the local login name: what `leger secrets sync` fills, and what
    # legerd's socket lets this user read (the control plane's user name may differ).
    source = default_source(where.state, getpass.getuser() if login else None)
    return Deployer(where, source, progress=progress, lock_timeout=lock_timeout())


def lock_timeout() -> float:
    """``LEGER_LOCK_TIMEOUT``: seconds to wait for another leger operation (default 300)."""
    raw = os.environ.get("LEGER_LOCK_TIMEOUT")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        die(f"LEGER_LOCK_TIMEOUT={raw!r} is not a number of seconds", 2)


def guard(action: Callable[[], T]) -> T:
    """Run ``action``; turn leger's errors into a message and a meaningful exit code."""
    try:
        return action()
    except RolledBack as exc:
        fail(str(exc), EXIT_ROLLED_BACK)
    except ConflictError as exc:
        fail(str(exc), EXIT_CONFLICT)
    except (StagingError, BackupError) as exc:
        code = EXIT_NOT_FOUND if "nothing staged" in str(exc) or "no backup" in str(exc) else 1
        fail(str(exc), code)
    except DeployError as exc:
        code = EXIT_NOT_FOUND if str(exc).startswith("no deployment") else EXIT_FAILED
        fail(str(exc), code)
    except RemoteNotFound as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except RemoteConflict as exc:
        fail(str(exc), EXIT_CONFLICT)
    except RemoteRejected as exc:
        # The control plane refused what the arguments asked for (a version that is not one).
        fail(str(exc), EXIT_USAGE)
    except SourceError as exc:
        fail(str(exc), _source_exit(str(exc)))
    except (MissingSecret, ControlPlaneError, ChecksumMismatch) as exc:
        # ControlPlaneError here: out of reach, not JSON, not logged in, refused (401, 403).
        fail(str(exc), EXIT_FAILED)
    except (PodmanError, SystemdError, LockTimeout) as exc:
        fail(str(exc), EXIT_FAILED)
    except (ParseError, UnicodeDecodeError) as exc:
        # Invalid quadlets are a validation failure (1), like `leger validate`, not usage (2).
        fail(f"invalid quadlet: {exc}", EXIT_FAILED)
    except ValidationError as exc:
        fail(f"invalid data: {validation_message(exc)}", EXIT_FAILED)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)


# A --source that names nothing there (no such directory, not a git URL) is a bad argument.
_BAD_SOURCE = ("is neither a directory nor a git URL", "is not a directory")


def _source_exit(message: str) -> int:
    return EXIT_USAGE if message.endswith(_BAD_SOURCE) else EXIT_FAILED


@contextmanager
def steps(title: str, *, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A Rich spinner that shows the current step of a long operation (on stderr)."""
    if quiet:
        yield lambda _step: None
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task(title)

        def update(step: str) -> None:
            progress.update(task, description=f"{title}: {step}")

        yield update


def die(message: str, code: int = EXIT_FAILED) -> NoReturn:
    fail(message, code)
