"""Environment variables: which ones are harmless to set, and ``VAR=value`` words."""

from __future__ import annotations

from collections.abc import Iterable

from legator.fleet.policy.levels import OBSERVE, REMEDIATE

# Variables that only choose a language, time zone, terminal size or colours. Any other
# variable can change what a program runs or writes (PATH, LD_PRELOAD, LESSOPEN, PAGER,
# BASH_ENV, PYTHONSTARTUP, GIT_*, KUBECONFIG, …), so setting it is ``remediate``.
SAFE_ENV = frozenset({"LANG", "LANGUAGE", "TZ", "COLUMNS", "LINES", "TERM", "NO_COLOR"})


def env_is_safe(name: str) -> bool:
    return name in SAFE_ENV or name.startswith("LC_")


def classify_env(names: Iterable[str]) -> str:
    """The level needed to run a command with these environment variables set."""
    return OBSERVE if all(env_is_safe(name) for name in names) else REMEDIATE


def is_assignment(word: str) -> bool:
    name, equals, _ = word.partition("=")
    return bool(equals) and name.isidentifier()
