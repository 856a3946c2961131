"""Helpers every CLI shares: errors to exit codes, JSON output, tables, secrets from stdin."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from legator.core.config import ConfigError
from legator.core.errors import AppError, Conflict, NotFound

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)

EXIT_OK = 0
EXIT_FAILED = 1  # the operation was refused or failed
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine and turn domain errors into a message and a meaningful exit code."""
    try:
        return asyncio.run(factory())  # type: ignore[arg-type]
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except NotFound as exc:
        fail(exc.message, EXIT_NOT_FOUND)
    except Conflict as exc:
        fail(exc.message, EXIT_CONFLICT)
    except AppError as exc:
        fail(exc.message, EXIT_FAILED)
    except (ConnectionError, SQLAlchemyError) as exc:
        # The database out of reach or refusing: what the driver said, on one line.
        fail(f"database: {one_line(exc)}", EXIT_FAILED)
    except OSError as exc:
        fail(one_line(exc), EXIT_FAILED)


def one_line(exc: BaseException) -> str:
    """An exception's message without the driver's extra lines (SQL, links to docs)."""
    text = str(exc).strip().splitlines()
    return " ".join(text[0].split()) if text else type(exc).__name__


def to_jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(value), indent=2, default=str) + "\n")


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console.print(table)


def print_listing(
    items: Sequence[T],
    json_output: bool,
    title: str,
    columns: Sequence[str],
    row: Callable[[T], Sequence[Any]],
) -> None:
    """A listing as JSON (``--json``), or as a table with ``row(item)`` for each item."""
    if json_output:
        print_json(items)
        return
    print_table(title, columns, (row(item) for item in items))


def print_fields(title: str, fields: Iterable[tuple[str, Any]]) -> None:
    """One object as a two-column table of its fields."""
    print_table(title, ["field", "value"], fields)


def fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


_DURATION = re.compile(r"^(\d+)([dhm]?)$")


def parse_duration(text: str) -> timedelta:
    """``90`` or ``90d`` days, ``12h`` hours, ``30m`` minutes."""
    match = _DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise typer.BadParameter("expected a positive duration like 90d, 12h or 30m")
    number, unit = int(match.group(1)), match.group(2) or "d"
    return {
        "d": timedelta(days=number),
        "h": timedelta(hours=number),
        "m": timedelta(minutes=number),
    }[unit]


def read_secret(prompt: str, *, from_stdin: bool, confirm: bool = True) -> str | None:
    """A secret from stdin (``--password-stdin``) or a hidden prompt; never from argv."""
    if from_stdin:
        value = sys.stdin.readline().rstrip("\r\n")
        return value or None
    if sys.stdin.isatty():
        value: str = typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
        return value
    return None
