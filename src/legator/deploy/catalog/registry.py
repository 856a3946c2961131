"""What each catalogue service is: its options, its dependencies and the secrets it needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from legator.deploy.catalog import options as o


@dataclass(frozen=True)
class SecretNeed:
    name: str  # the Podman/legerd secret name
    target: str  # the environment variable inside the container
    description: str


@dataclass(frozen=True)
class ServiceTemplate:
    name: str
    title: str
    description: str
    options: type[o.ServiceOptions]
    container_port: int
    data_path: str
    # Services this one needs, given its options (e.g. LiteLLM with database=postgres).
    requires: Callable[[Any], list[str]] = field(default=lambda _opts: [])
    secrets: Callable[[Any], list[SecretNeed]] = field(default=lambda _opts: [])

    def schema(self) -> dict[str, Any]:
        return self.options.model_json_schema()


def _openwebui_requires(opts: o.OpenWebUIOptions) -> list[str]:
    return ["litellm"] + (["postgres"] if opts.database == "postgres" else [])


def _openwebui_secrets(opts: o.OpenWebUIOptions) -> list[SecretNeed]:
    needs = [
        SecretNeed("openwebui-secret-key", "WEBUI_SECRET_KEY", "Open WebUI session signing key"),
        SecretNeed("litellm-master-key", "OPENAI_API_KEY", "key Open WebUI uses for LiteLLM"),
    ]
    if opts.database == "postgres":
        needs.append(SecretNeed("openwebui-database-url", "DATABASE_URL", "PostgreSQL URL"))
    return needs


def _litellm_requires(opts: o.LiteLLMOptions) -> list[str]:
    return (["postgres"] if opts.database == "postgres" else []) + (["redis"] if opts.cache else [])


def _litellm_secrets(opts: o.LiteLLMOptions) -> list[SecretNeed]:
    needs = [SecretNeed("litellm-master-key", "LITELLM_MASTER_KEY", "LiteLLM admin key")]
    if opts.database == "postgres":
        needs.append(SecretNeed("litellm-database-url", "DATABASE_URL", "PostgreSQL URL"))
    return needs


CATALOG: dict[str, ServiceTemplate] = {
    t.name: t
    for t in (
        ServiceTemplate(
            "openwebui",
            "Open WebUI",
            "Chat web interface; talks to models through LiteLLM.",
            o.OpenWebUIOptions,
            8080,
            "/app/backend/data",
            _openwebui_requires,
            _openwebui_secrets,
        ),
        ServiceTemplate(
            "litellm",
            "LiteLLM",
            "OpenAI-compatible proxy in front of your model backends.",
            o.LiteLLMOptions,
            4000,
            "/data",
            _litellm_requires,
            _litellm_secrets,
        ),
        ServiceTemplate(
            "postgres",
            "PostgreSQL",
            "Relational database for the services that want one.",
            o.PostgresOptions,
            5432,
            "/var/lib/postgresql/data",
            secrets=lambda _o: [
                SecretNeed("postgres-password", "POSTGRES_PASSWORD", "superuser password")
            ],
        ),
        ServiceTemplate("redis", "Redis", "In-memory cache.", o.RedisOptions, 6379, "/data"),
        ServiceTemplate(
            "searxng",
            "SearXNG",
            "Private metasearch engine (web search for Open WebUI).",
            o.SearXNGOptions,
            8080,
            "/etc/searxng",
            secrets=lambda _o: [
                SecretNeed("searxng-secret", "SEARXNG_SECRET", "SearXNG server secret")
            ],
        ),
        ServiceTemplate(
            "whisper", "Whisper", "Speech-to-text API.", o.WhisperOptions, 9000, "/root/.cache"
        ),
        ServiceTemplate(
            "jupyter",
            "Jupyter",
            "Notebook server.",
            o.JupyterOptions,
            8888,
            "/home/jovyan/work",
            secrets=lambda _o: [SecretNeed("jupyter-token", "JUPYTER_TOKEN", "login token")],
        ),
        ServiceTemplate(
            "llamacpp",
            "llama.cpp backend",
            "llama.cpp server with an OpenAI-compatible API for one GGUF model.",
            o.LlamaCppOptions,
            8080,
            "/models",
            secrets=lambda _o: [
                SecretNeed("llamacpp-api-key", "LLAMA_API_KEY", "API key clients must send")
            ],
        ),
    )
}
