"""Access rules, as setec's capability grants: a rule allows some actions on the secrets whose
names match its patterns. Rules come from the caller's Tailscale capability map or from the
local policy file, whose entries also name the principals they apply to."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from legator.core.logging import get_logger

log = get_logger("legerd")


class Action(StrEnum):
    GET = "get"
    INFO = "info"
    PUT = "put"
    ACTIVATE = "activate"
    DELETE = "delete"
    CREATE_VERSION = "create-version"


ALL_ACTIONS = frozenset(Action)

# setec's older names for two actions (its ``list`` became ``info``, ``set-active`` became
# ``activate``): grants written for an older setec keep meaning what they meant.
LEGACY_ACTIONS = {"list": Action.INFO, "set-active": Action.ACTIVATE}


def known_action(name: str) -> Action | None:
    """The action ``name`` grants (a current or a legacy name), else None."""
    if name in LEGACY_ACTIONS:
        return LEGACY_ACTIONS[name]
    try:
        return Action(name)
    except ValueError:
        return None


def _compile(pattern: str) -> re.Pattern[str]:
    # Only ``*`` is special (any run of characters, ``/`` included), as in setec; fnmatch
    # would also give meaning to ``?`` and ``[``, which are legal in secret names. \Z, not $,
    # which also matches before a final newline (Go's $, setec's, does not).
    body = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(r"\A" + body + r"\Z")


@dataclass(frozen=True)
class Rule:
    actions: frozenset[Action]
    secrets: tuple[re.Pattern[str], ...]

    @classmethod
    def build(cls, actions: Iterable[str], secrets: Iterable[str]) -> Rule:
        """A rule for ``actions`` (legacy names included) on ``secrets``; an unknown action
        is a ValueError."""
        granted = set()
        for name in actions:
            action = known_action(name)
            if action is None:
                raise ValueError(f"unknown action {name!r}")
            granted.add(action)
        return cls(frozenset(granted), tuple(_compile(s) for s in secrets))

    def allows(self, action: Action, name: str) -> bool:
        return action in self.actions and any(p.match(name) for p in self.secrets)


ALLOW_ALL = Rule(ALL_ACTIONS, (_compile("*"),))


class AclError(ValueError):
    pass


_warned: set[tuple[str, ...]] = set()


def parse_grant(entry: Any, where: str, *, ignore_unknown: bool = False) -> Rule:
    """One setec grant ``{"action": [...], "secret": [...]}``. An action neither current nor
    legacy is refused (AclError), or with ``ignore_unknown`` grants nothing, as in setec: a
    tailnet grant is only read while a request waits, and must not turn it into a 500."""
    if not isinstance(entry, dict):
        raise AclError(f"{where}: a rule must be an object")
    actions, secrets = entry.get("action"), entry.get("secret")
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        raise AclError(f"{where}: 'action' must be a list of strings")
    unknown = sorted({a for a in actions if known_action(a) is None})
    if unknown:
        if not ignore_unknown:
            raise AclError(
                f"{where}: unknown action(s) {', '.join(unknown)}; known: "
                f"{', '.join(a.value for a in Action)} (and the older "
                f"{', '.join(LEGACY_ACTIONS)})"
            )
        if (where, *unknown) not in _warned:  # once, not on every request
            _warned.add((where, *unknown))
            log.warning("unknown actions in a grant grant nothing", where=where, unknown=unknown)
        actions = [a for a in actions if a not in unknown]
    if not isinstance(secrets, list) or not all(isinstance(s, str) and s for s in secrets):
        raise AclError(f"{where}: 'secret' must be a list of non-empty patterns")
    return Rule.build(actions, secrets)


def refuse_if_others_may_write(path: Path) -> None:
    """The policy grants access to secrets: whoever may rewrite it may grant themselves any.
    So it must belong to root or to legerd's own user, and neither group nor others may
    write it."""
    info = path.stat()
    if info.st_uid not in (0, os.geteuid()):
        raise AclError(
            f"{path}: owned by uid {info.st_uid}, who could grant themselves any secret; "
            f"it must belong to root or to legerd's user (uid {os.geteuid()}): chown it"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise AclError(f"{path}: writable by others (mode {mode:o}); chmod go-w it")


@dataclass(frozen=True)
class PolicyEntry:
    principals: tuple[re.Pattern[str], ...]
    rule: Rule

    def applies_to(self, principals: Iterable[str]) -> bool:
        return any(p.match(who) for p in self.principals for who in principals)


class Policy:
    """The local policy file: ``[{"principal": ..., "action": [...], "secret": [...]}]``.

    A principal is a Tailscale login name (``alice@example.com``), a node tag
    (``tag:prod``), a local user on the unix socket (``unix:alice``, ``uid:1000``), or a
    pattern with ``*``; ``principal`` may be a string or a list.
    """

    def __init__(self, entries: list[PolicyEntry] | None = None) -> None:
        self.entries = entries or []

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        if path is None:
            return cls()
        try:
            refuse_if_others_may_write(path)
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise AclError(f"{path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise AclError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(raw, list):
            raise AclError(f"{path}: the policy must be a JSON list of rules")
        entries = []
        for index, entry in enumerate(raw):
            where = f"{path} rule {index}"
            rule = parse_grant(entry, where)
            principal = entry.get("principal")
            names = [principal] if isinstance(principal, str) else principal
            if (
                not isinstance(names, list)
                or not names
                or not all(isinstance(n, str) and n for n in names)
            ):
                raise AclError(f"{where}: 'principal' must be a string or a list of strings")
            entries.append(PolicyEntry(tuple(_compile(n) for n in names), rule))
        return cls(entries)

    def rules_for(self, principals: Iterable[str]) -> list[Rule]:
        who = list(principals)
        return [e.rule for e in self.entries if e.applies_to(who)]
