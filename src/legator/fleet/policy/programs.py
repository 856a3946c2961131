"""The programs with rules of their own, by name: the table :func:`classify_argv` consults
before the lists of :mod:`known`."""

from __future__ import annotations

from collections.abc import Callable

from legator.fleet.policy import (
    programs_containers,
    programs_net,
    programs_system,
    programs_text,
    programs_tracers,
)

SPECIAL: dict[str, Callable[[list[str]], str]] = {
    **programs_text.RULES,
    **programs_net.RULES,
    **programs_system.RULES,
    **programs_containers.RULES,
    **programs_tracers.RULES,
}
