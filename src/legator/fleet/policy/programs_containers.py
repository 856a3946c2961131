"""Rules for container runtimes and Kubernetes: docker, podman, crictl and kubectl."""

from __future__ import annotations

import functools
from collections.abc import Callable

from legator.fleet.policy.levels import DIAGNOSE, REMEDIATE
from legator.fleet.policy.options import Syntax, names, parse, verb

_CONTAINER_READ = frozenset(
    {
        "ps",
        "logs",
        "inspect",
        "images",
        "stats",
        "top",
        "version",
        "info",
        "port",
        "diff",
        "events",
        "history",
        "search",
    }
)


_DOCKER = Syntax(
    short_values="cHl",
    short_flags="Dvh",
    long_values=names("config context host log-level tlscacert tlscert tlskey"),
    long_flags=names("debug tls tlsverify version help"),
    stop_at_word=True,
)
# Podman's other global options point it at other runtimes, hooks, storage or output files.
_PODMAN = Syntax(
    short_values="c",
    short_flags="rvh",
    long_values=names("connection url identity log-level"),
    long_flags=names("remote version help noout"),
    stop_at_word=True,
)
_CRICTL = Syntax(
    short_values="rict",
    short_flags="Dvh",
    long_values=names("runtime-endpoint image-endpoint config timeout"),
    long_flags=names("debug version help"),
    stop_at_word=True,
)
_CONTAINER_SYNTAX = {"docker": _DOCKER, "podman": _PODMAN, "crictl": _CRICTL}
_SUBCOMMAND_ARGS = Syntax(short_flags="", stop_at_word=True)  # no option before a sub-verb


def _container(program: str, args: list[str]) -> str:
    parsed = parse(args, _CONTAINER_SYNTAX[program])
    word = verb(parsed)
    if word in ("container", "image", "volume", "network", "pod", "system"):
        sub = verb(parse(parsed.words[1:], _SUBCOMMAND_ARGS))
        reads = {"ls", "list", "inspect", "ps", "df", "info"} | _CONTAINER_READ
        return DIAGNOSE if sub in reads else REMEDIATE
    return DIAGNOSE if word in _CONTAINER_READ else REMEDIATE


_KUBECTL = Syntax(
    short_values="nsvolc",
    short_flags="Ah",
    long_values=names(
        "namespace context cluster user server as as-group as-uid certificate-authority "
        "client-certificate client-key password username request-timeout tls-server-name "
        "token v vmodule log-flush-frequency output selector kubeconfig cache-dir profile "
        "profile-output log-file log-dir output-directory"
    ),
    long_flags=names(
        "insecure-skip-tls-verify match-server-version warnings-as-errors "
        "disable-compression help all-namespaces"
    ),
)
# A kubeconfig can name credential plugins (commands); the others write files.
_KUBECTL_DANGEROUS = frozenset(
    {"--kubeconfig", "--cache-dir", "--profile", "--profile-output", "--log-file", "--log-dir",
     "--output-directory"}
)  # fmt: skip
_KUBECTL_READ = frozenset(
    {"get", "describe", "logs", "top", "version", "explain", "api-resources", "api-versions",
     "cluster-info"}
)  # fmt: skip


def _kubectl(args: list[str]) -> str:
    parsed = parse(args, _KUBECTL)
    if parsed.has(*_KUBECTL_DANGEROUS):
        return REMEDIATE
    return DIAGNOSE if verb(parsed) in _KUBECTL_READ else REMEDIATE


RULES: dict[str, Callable[[list[str]], str]] = {
    "docker": functools.partial(_container, "docker"),
    "podman": functools.partial(_container, "podman"),
    "crictl": functools.partial(_container, "crictl"),
    "kubectl": _kubectl,
}
