"""The level classifier and policy evaluation, shared by the control plane and the probe.

Pure (stdlib only). A command is ``observe`` (reads state), ``diagnose`` (inspects more
deeply: logs, sockets, network probes) or ``remediate`` (changes something, or could). Shell
command lines are split on ``;``, ``&&``, ``||``, ``|``, ``&``, newlines and subshells; command
substitutions (``$( )``, backticks, ``<( )``) are classified on their own; a redirection that
writes a file is ``remediate``. A compound command is as strong as its strongest part; a line
that cannot be parsed, and any program this package does not know, is ``remediate``.

Hand-written on purpose: no maintained library classifies shell commands by effect; the
tokenising itself is done by ``shlex``.

Modules: ``levels`` (the levels and their order), ``env`` (environment variables),
``options`` (getopt-style option parsing), ``lexer`` (splitting a shell line), ``known``
(programs known by name), ``programs`` (the table of per-program rules, kept in
``programs_text``, ``programs_net``, ``programs_system``, ``programs_containers`` and
``programs_tracers``), ``argv`` (one program invocation), ``shell`` (a shell line, a
request), ``unwrap`` (the commands a line runs, for the block list), ``prefixes`` (an allow
or block list compiled once), ``limits`` (how large a policy may be), ``network`` (whether
a command may reach another host) and ``decision`` (``Policy`` and ``evaluate``).
"""

from __future__ import annotations

from legator.fleet.policy.decision import Decision, Policy, evaluate
from legator.fleet.policy.env import classify_env
from legator.fleet.policy.levels import DIAGNOSE, OBSERVE, REMEDIATE, rank, strongest, weakest
from legator.fleet.policy.limits import policy_problem
from legator.fleet.policy.network import reaches_network
from legator.fleet.policy.shell import classify, command_parts

__all__ = [
    "DIAGNOSE",
    "OBSERVE",
    "REMEDIATE",
    "Decision",
    "Policy",
    "classify",
    "classify_env",
    "command_parts",
    "evaluate",
    "policy_problem",
    "rank",
    "reaches_network",
    "strongest",
    "weakest",
]
