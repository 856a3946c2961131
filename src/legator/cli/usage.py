"""`legator usage`: the gateway's usage report (online), your own or everyone's."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from legator.cli.common import EXIT_USAGE, console, fail, print_json, print_table
from legator.cli.online import DEFAULT_SERVER, JsonFlag, ServerOpt, call


class Grouping(StrEnum):
    model = "model"
    user = "user"
    key = "key"
    user_model = "user-model"
    time = "time"


# --by: the report's list and the columns that name each of its rows
_VIEWS: dict[Grouping, tuple[str, list[str]]] = {
    Grouping.model: ("by_model", ["model"]),
    Grouping.user: ("by_user", ["user"]),
    Grouping.key: ("by_key", ["key id"]),
    Grouping.user_model: ("by_user_and_model", ["user", "model"]),
    Grouping.time: ("timeline", ["from (UTC)"]),
}


def usage(
    period: Annotated[
        str | None,
        typer.Option(help="hour, day, week or month back from now (default day)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Start of a range instead, e.g. 2026-11-01 (no zone: UTC)."),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="End of the range, excluded (default now).")
    ] = None,
    by: Annotated[
        Grouping, typer.Option(help="What each row totals; user, key and user-model need --all.")
    ] = Grouping.model,
    everyone: Annotated[
        bool, typer.Option("--all", help="Everyone's usage (gateway:admin), not only yours.")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    json_output: JsonFlag = False,
) -> None:
    """Requests, tokens and errors over a period or a range. Billing a calendar month:
    `legator usage --all --by user-model --since 2026-11-01 --until 2026-12-01`."""
    field, names = _VIEWS[by]
    if field in ("by_user", "by_key", "by_user_and_model") and not everyone:
        fail(f"--by {by.value} needs --all", EXIT_USAGE)
    params = {
        name: value
        for name, value in (("period", period), ("since", since), ("until", until))
        if value is not None
    }
    path = "/api/v1/gateway/usage/all" if everyone else "/api/v1/gateway/usage"
    report: dict[str, Any] = call(server, "GET", path, params=params)
    if json_output:
        print_json(report)
        return
    print_table(
        f"Usage from {report['since'][:16]} to {report['until'][:16]} UTC",
        [*names, "requests", "input tokens", "output tokens", "errors"],
        (
            (
                row["group"],
                *([row["model"]] if by is Grouping.user_model else []),
                row["requests"],
                row["input_tokens"],
                row["output_tokens"],
                row["errors"],
            )
            for row in report[field]
        ),
    )
    console.print(
        f"total: {report['requests']} requests, {report['input_tokens']} input and "
        f"{report['output_tokens']} output tokens"
    )
