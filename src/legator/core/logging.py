"""structlog set-up: JSON when not on a terminal, human-readable on one; every line carries
the request id and passes the secret sanitiser."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Any

import structlog

from legator.core.audit.sanitiser import sanitise
from legator.core.context import current_request_id


def _add_request_id(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    request_id = current_request_id()
    if request_id:
        event.setdefault("request_id", request_id)
    return event


# Added by the pipeline itself, never holding a secret: not scanned (a search each per line).
_OWN_FIELDS = ("timestamp", "level", "logger")


def _sanitise(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    own = {name: event.pop(name) for name in _OWN_FIELDS if name in event}
    clean: dict[str, Any] = sanitise(event)
    clean.update(own)
    return clean


_write_lock = threading.Lock()


def _write_line(line: str) -> None:
    """One whole line to the ``sys.stdout`` of the moment (looked up per line, so that a
    redirected stdout, such as a test's capture, gets it)."""
    with _write_lock:
        stream = sys.stdout
        stream.write(line + "\n")
        stream.flush()


class _LineWriter:
    """Where structlog hands each of Legator's rendered lines."""

    def __init__(self, name: str = "") -> None:
        self.name = name  # what add_logger_name reads

    def msg(self, message: str) -> None:
        # A closed or broken stdout: as with stdlib logging, the line is lost but the request
        # that logged it goes on.
        with contextlib.suppress(OSError, ValueError):
            _write_line(message)

    debug = info = warn = warning = error = err = critical = fatal = exception = log = msg


class _LibraryHandler(logging.Handler):
    """Libraries' records (uvicorn, SQLAlchemy, Alembic), rendered like Legator's own lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.format(record))
        except Exception:
            self.handleError(record)


def _line_writer(*args: Any) -> _LineWriter:
    return _LineWriter(*args[:1])  # get_logger(name) passes the name


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_request_id,
        structlog.processors.format_exc_info,
        _sanitise,
    ]
    # Legator's own lines are rendered and written by structlog itself: going through stdlib
    # logging cost two LogRecords and a formatter per line, a third of a line's CPU, and the
    # access log writes one per request.
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_line_writer,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _LibraryHandler()
    handler.setFormatter(formatter)
    # No line shows where a call came from or its thread or process: skip collecting them
    # (a walk up the stack per line), as the logging HOWTO's "Optimization" section says.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("uvicorn.access", "aiosqlite", "httpx", "httpcore", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
