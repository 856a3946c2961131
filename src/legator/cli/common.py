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
from pydantic import BaseModel, ValidationError
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
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
    # soft_wrap: one line however narrow the terminal (or 80 columns when not one), so a
    # log or a grep gets the whole message.
    # escape: a server's message is text, never Rich markup ("[admin] …" stays as written).
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
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


# Columns whose values are pasted back into other commands (`keys revoke ID`, `tokens delete
# ID`, `probes show ID`, …): shown whole, never cut to "66cf833…" on a narrow terminal.
KEY_COLUMNS = frozenset(
    {"id", "prefix", "name", "probe", "for probe", "model", "user", "username", "unit", "secret"}
)
_OTHER_MIN = 4  # the narrowest a squeezed column gets ("ab…" and its padding)


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    keys: Iterable[str] | None = None,
) -> None:
    """A table on stdout. The key columns (``keys``, default ``KEY_COLUMNS`` by name) keep
    every character on one line; the others wrap, and are cut with "…" when the terminal is
    too narrow. Where even the key columns do not fit, the whole table is printed at its
    natural width, wider than the terminal (which wraps its lines), rather than cut an id."""
    key_names = {k.lower() for k in (KEY_COLUMNS if keys is None else keys)}
    cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
    table = Table(title=title, title_justify="left")
    frame = 1 + 3 * len(columns)  # the borders and a space each side of every cell
    needed = natural = frame
    for index, column in enumerate(columns):
        widest = max(
            [cell_len(column), *(cell_len(row[index]) for row in cells if index < len(row))]
        )
        natural += widest
        if column.lower() in key_names:
            table.add_column(column, no_wrap=True, min_width=widest)
            needed += widest
        else:
            table.add_column(column)
            needed += min(widest, _OTHER_MIN)
    for row in cells:
        table.add_row(*row)
    if needed <= console.width:
        console.print(table)
    else:
        table.width = natural
        console.print(table, crop=False)


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


def validation_message(exc: ValidationError | ValueError) -> str:
    """Every error of a Pydantic validation, as ``field: message`` joined with "; " (one line
    for ``fail``): ``username: must be 1-64 characters…; password: must be at least 12
    characters``. Any other ``ValueError`` as its text."""
    if not isinstance(exc, ValidationError):
        return one_line(exc)
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if field:
            message = message.removeprefix(f"{field} ")  # "password must be…": "must be…"
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts) or one_line(exc)


def fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


_DURATION = re.compile(r"^(\d+)([dhm]?)\Z")


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
