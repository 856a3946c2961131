"""The process log: JSON lines on stdout, Legator's own and the libraries', all redacted."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import pytest

from legator.core.context import request_id_var
from legator.core.logging import configure_logging, get_logger

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_lines(capsys: pytest.CaptureFixture[str]) -> Lines:
    configure_logging("info", "json")
    capsys.readouterr()

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    return lines


def test_own_lines_carry_level_logger_time_and_request_id_and_are_redacted(
    json_lines: Lines,
) -> None:
    token = request_id_var.set("req-0123456789")
    try:
        get_logger("legator.test.own").info(
            "called %s", "upstream", password="hunter2", url="https://u:pw@host/x"
        )
    finally:
        request_id_var.reset(token)
    [line] = json_lines()
    assert line["event"] == "called upstream"
    assert line["level"] == "info"
    assert line["logger"] == "legator.test.own"
    assert line["request_id"] == "req-0123456789"
    assert line["password"] == "[REDACTED]"
    assert "pw" not in str(line["url"])
    assert str(line["timestamp"]).endswith("Z")


def test_exceptions_are_rendered_and_redacted(json_lines: Lines) -> None:
    log = get_logger("legator.test.exc")
    try:
        raise ValueError("token=abcdefgh123 refused")
    except ValueError:
        log.exception("it failed")
    [line] = json_lines()
    assert line["level"] == "error"
    assert "ValueError" in str(line["exception"])
    assert "abcdefgh123" not in str(line["exception"])


def test_library_lines_go_through_the_same_pipeline(json_lines: Lines) -> None:
    logging.getLogger("some.library").warning("auth header: Bearer abcdefghijklmnop")
    [line] = json_lines()
    assert line["logger"] == "some.library"
    assert line["level"] == "warning"
    assert "abcdefghijklmnop" not in str(line["event"])


def test_lines_below_the_level_are_not_written(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure_logging("warning", "json")
        log = get_logger("legator.test.level")
        assert not log.is_enabled_for(logging.INFO)
        log.info("quiet")
        logging.getLogger("some.library").info("quiet too")
        log.warning("loud")
        assert [json.loads(x)["event"] for x in capsys.readouterr().out.splitlines()] == ["loud"]
    finally:
        configure_logging("info", "json")


def test_a_line_that_cannot_be_written_fails_no_caller(
    json_lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    get_logger("legator.test.closed").warning("lost")  # raises nothing
    logging.getLogger("some.library").warning("lost too")
    monkeypatch.undo()
    get_logger("legator.test.closed").warning("written")
    assert [line["event"] for line in json_lines()] == ["written"]
