"""Settings: every ``LEGATOR_*`` variable, validated once at start-up."""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "LEGATOR_"
# Shortest LEGATOR_AUDIT_CHAIN_KEY: anyone who guesses the key can rewrite the log and its
# chain alike, and 16 random characters are beyond guessing (docs suggest 64 hex).
AUDIT_CHAIN_KEY_MIN_CHARS = 16
_HEX = re.compile(r"^[0-9a-fA-F]+\Z")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_SUBJECT_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}\Z")
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+\Z")  # RFC 6749 scope-token characters
OIDC_CALLBACK_PATH = "/api/v1/auth/oidc/callback"


def is_loopback_host(host: str) -> bool:
    """Whether a host is ``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """Whether a URL's host is ``localhost`` or a loopback address."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:  # a malformed [IPv6] host
        return False
    return is_loopback_host(host)


class ConfigError(Exception):
    """A setting has a bad value; ``str()`` is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, env_ignore_empty=True
    )

    addr: str = Field(
        ":8080", description="Listen address, HOST:PORT; ':PORT' means all interfaces."
    )
    data_dir: Path | None = Field(None, description="State directory; unset = in-memory SQLite.")
    # Not in the repr: the URL may hold the database's password.
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; overrides data_dir.", repr=False
    )
    signing_key: SecretStr | None = Field(None, description="Master signing key, 64+ hex chars.")
    auth: bool = Field(True, description="Require authentication (false only on loopback).")
    server_url: str | None = Field(None, description="Public URL of this control plane.")
    trusted_proxies: str = Field("127.0.0.1", description="Proxies whose X-Forwarded-* we trust.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    access_log: bool = Field(True, description="One log line per request, at level info.")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    session_ttl_hours: int = Field(24, ge=1, le=24 * 30)
    metrics_public: bool = False
    audit_chain_key: SecretStr | None = None
    audit_retention_days: int = Field(
        0, ge=0, le=36500, description="Audit events older than this are purged; 0 keeps all."
    )
    tailscale_socket: Path | None = Field(
        None, description="tailscaled's LocalAPI socket; set to sign leger in by Tailscale."
    )
    tailscale_login_via_proxy: bool = Field(
        False,
        description="Tailscale sign-in trusts a trusted proxy's X-Forwarded-For for the caller.",
    )
    approval_ttl: int = Field(900, ge=30, le=7 * 24 * 3600, description="Approval expiry, seconds.")
    model_network_approval: bool = Field(
        True,
        description="A command a model wrote (chat, task, MCP) that can reach another host "
        "waits for a person, unless the target's approval mode is none.",
    )
    secrets_dir: Path | None = Field(
        None, description="Secrets store directory; unset = <data_dir>/secrets."
    )
    secrets_kek: SecretStr | None = Field(
        None, description="Secrets key-encryption key, 64 hex; unset = a key file."
    )

    gateway_llama_server: str = Field(
        "auto",
        description="Process runtime: 'auto', 'llama-server', 'llama-cpp-python' or a path.",
    )
    gateway_start_timeout_s: float = Field(
        120.0, ge=1, le=3600, description="Seconds a managed backend has to answer health."
    )
    gateway_podman_image: str = Field(
        "ghcr.io/ggml-org/llama.cpp:server", description="Podman runtime's llama.cpp image."
    )
    gateway_podman_flavour: Literal["llama-server", "llama-cpp-python"] = Field(
        "llama-server", description="What the podman image's entrypoint runs."
    )
    gateway_max_answer_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        le=1024 * 1024 * 1024,
        description="Largest backend answer (or stream event) taken; larger ones fail with 502.",
    )
    gateway_usage_retention_days: int = Field(
        90, ge=0, le=36500, description="Usage rows older than this are deleted; 0 keeps all."
    )

    llm_provider: Literal["", "openai", "anthropic", "local"] = ""
    llm_model: str = ""
    llm_api_key: SecretStr | None = None
    llm_base_url: str | None = Field(None, repr=False)  # may hold a proxy's credentials
    brain_max_steps: int = Field(12, ge=1, le=100, description="Task runner: most model turns.")
    brain_task_timeout_s: float = Field(
        900.0, gt=0, le=86400, description="Task runner: wall-clock limit of one task."
    )
    brain_approval_wait_s: float = Field(
        900.0, gt=0, le=86400, description="How long a chat or task waits for an approval."
    )
    brain_max_tokens: int = Field(
        1024, ge=16, le=200_000, description="Most tokens the model may write in one turn."
    )
    brain_output_chars: int = Field(
        4000, ge=200, le=1_000_000, description="Command output kept per stream for the model."
    )
    brain_session_retention_days: int = Field(
        90,
        ge=0,
        le=36500,
        description="Chat sessions idle longer than this are deleted; 0 keeps all.",
    )

    oidc_issuer: str | None = Field(
        None, description="Identity provider's issuer URL; set (with the next two) to enable SSO."
    )
    oidc_client_id: str | None = Field(None, description="Client id registered at the provider.")
    oidc_client_secret: SecretStr | None = Field(
        None, description="Client secret; unset = a public client (PKCE only)."
    )
    oidc_redirect_url: str | None = Field(
        None, description="<server>/api/v1/auth/oidc/callback, as registered at the provider."
    )
    oidc_scopes: str = Field("openid email profile", description="Scopes asked for.")
    oidc_default_role: Literal["operator", "viewer", "auditor"] = "viewer"
    oidc_create_users: bool = Field(
        True, description="Create a user at an unlinked identity's first sign-in; false = refuse."
    )

    fleet_token_ttl_s: int = Field(
        1800, ge=60, le=30 * 86400, description="Enrolment token lifetime, seconds."
    )
    fleet_offline_after_s: float = Field(
        90.0, ge=1, le=86400, description="A probe with no contact this long is offline."
    )
    fleet_flush_interval_s: float = Field(
        2.0, gt=0, le=60, description="How often buffered heartbeats are written."
    )
    fleet_command_grace_s: float = Field(
        30.0, ge=0, le=3600, description="Wait past a command's timeout before marking it lost."
    )
    fleet_command_retention_days: int = Field(
        30,
        ge=0,
        le=36500,
        description="Commands and their output older than this are deleted; 0 keeps all.",
    )

    nats_url: SecretStr | None = Field(
        None, description="NATS server(s) joining several replicas; unset = one process."
    )
    nats_subject_prefix: str = Field(
        "legator", description="First subject tokens of every cluster message."
    )
    nats_presence_interval_s: float = Field(
        5.0, ge=0.1, le=60, description="How often a replica lists its probes on the bus."
    )
    replica_id: str | None = Field(
        None, description="This replica's name on the bus; unset = hostname plus random."
    )
    replica_url: str | None = Field(
        None,
        description="Where the other replicas reach this one's HTTP API; with it, they forward "
        "/v1 requests for the models this replica serves.",
    )

    jobs_retry_max_attempts: int = Field(3, ge=1, le=100)
    jobs_retry_initial_backoff_s: float = Field(5.0, gt=0, le=3600)
    jobs_retry_max_backoff_s: float = Field(300.0, gt=0, le=86400)
    jobs_retry_multiplier: float = Field(2.0, ge=1.0, le=10.0)

    @field_validator("addr")
    @classmethod
    def _check_addr(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT or :PORT with a port from 1 to 65535")
        if host.startswith("[") != host.endswith("]"):
            raise ValueError("IPv6 hosts are written in brackets, like [::1]:8080")
        return value

    @field_validator("gateway_usage_retention_days")
    @classmethod
    def _covers_the_reports(cls, value: int) -> int:
        # The longest usage report looks back 30 days and the fairness window at most 7.
        if 0 < value < 31:
            raise ValueError("keep usage rows at least 31 days (the monthly report), or 0 for all")
        return value

    @field_validator("oidc_default_role", mode="before")
    @classmethod
    def _no_admin_by_default(cls, value: object) -> object:
        # Everyone with an account at the provider would command the fleet and read secrets.
        if value == "admin":
            raise ValueError(
                "admin is never given automatically: let the user sign in once, then promote them"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
            value = "postgresql+asyncpg://" + value.split("://", 1)[1]
        elif scheme in ("sqlite", "sqlite+aiosqlite"):
            value = "sqlite+aiosqlite://" + value.split("://", 1)[1]
        else:
            raise ValueError("expected a sqlite:/// or postgresql:// URL")
        # What the engine would refuse only once started, with a message naming nothing (the
        # URL may hold a password: the messages never echo it).
        try:
            url = make_url(value)
            port = url.port
        except (ArgumentError, ValueError):
            raise ValueError(
                "expected a URL like postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
            ) from None
        if port is not None and not 0 < port < 65536:
            raise ValueError("expected a port from 1 to 65535")
        if url.get_backend_name() == "sqlite" and url.host:
            raise ValueError("expected sqlite:////absolute/path.db (three slashes, then the path)")
        return value

    @field_validator("secrets_kek")
    @classmethod
    def _check_secrets_kek(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value().strip()
            if len(raw) != 64 or any(c not in "0123456789abcdefABCDEF" for c in raw):
                raise ValueError("must be 64 hex characters (a 32-byte key)")
        return value

    @field_validator("signing_key")
    @classmethod
    def _check_signing_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        raw = value.get_secret_value()
        if len(raw) < 64 or len(raw) % 2 or not _HEX.match(raw):
            raise ValueError("expected at least 64 hexadecimal characters (32 bytes)")
        return value

    @field_validator("audit_chain_key")
    @classmethod
    def _check_audit_chain_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        if len(value.get_secret_value().strip()) < AUDIT_CHAIN_KEY_MIN_CHARS:
            # The value is a secret: name the rule, never echo it.
            raise ValueError(
                f"expected at least {AUDIT_CHAIN_KEY_MIN_CHARS} characters, e.g. the output of "
                "`openssl rand -hex 32`"
            )
        return value

    @field_validator(
        "server_url", "llm_base_url", "oidc_issuer", "oidc_redirect_url", "replica_url"
    )
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("replica_url")
    @classmethod
    def _no_credentials_in_replica_url(cls, value: str | None) -> str | None:
        # It is logged, and stored with the backends it serves.
        if value and "@" in urlsplit(value).netloc:
            raise ValueError(
                "a replica URL carries no credentials: forwarded requests carry the client's key"
            )
        return value

    @field_validator("oidc_issuer")
    @classmethod
    def _check_oidc_issuer(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("http://") and not is_loopback_url(value):
            # Discovery and keys fetched over plain HTTP could be swapped by anyone on the path.
            raise ValueError("must be an https:// URL (http:// only for a loopback provider)")
        parts = urlsplit(value)
        if parts.username is not None or parts.query or parts.fragment or "#" in value:
            # An issuer is a bare URL (OIDC Discovery §3); a password in it would also end up
            # in every log line that names the discovery URL.
            raise ValueError("expected a URL without user:password@, ?query or #fragment")
        return value

    @field_validator("oidc_redirect_url")
    @classmethod
    def _check_oidc_redirect(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if not parts.path.endswith(OIDC_CALLBACK_PATH) or parts.fragment or "#" in value:
            raise ValueError(f"expected the server's URL followed by {OIDC_CALLBACK_PATH}")
        if parts.username is not None:
            raise ValueError("expected a URL without user:password@")
        return value

    @field_validator("oidc_client_id", "oidc_client_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("oidc_scopes")
    @classmethod
    def _check_oidc_scopes(cls, value: str) -> str:
        scopes = value.split()
        if "openid" not in scopes:
            raise ValueError("must include 'openid' (space-separated scopes)")
        if any(not _SCOPE.match(scope) for scope in scopes):
            raise ValueError("expected scopes separated by spaces, without quotes or backslashes")
        return " ".join(scopes)

    @field_validator("nats_url")
    @classmethod
    def _check_nats_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        for server in value.get_secret_value().split(","):
            scheme, sep, rest = server.strip().partition("://")
            if not sep or scheme not in ("nats", "tls") or not rest.rpartition("@")[2]:
                # The value may carry a password: name the rule, never echo the value.
                raise ValueError(
                    "expected nats://HOST:PORT or tls://HOST:PORT (several separated by commas)"
                )
        return value

    @field_validator("nats_subject_prefix")
    @classmethod
    def _check_subject_prefix(cls, value: str) -> str:
        if not _SUBJECT_PREFIX.match(value):
            raise ValueError("expected dot-separated tokens of letters, digits, '-' and '_'")
        return value

    @field_validator("replica_id")
    @classmethod
    def _check_replica_id(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not _TOKEN.match(value):
            raise ValueError("expected 1 to 64 letters, digits, '-' or '_'")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            if item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError as exc:
                    raise ValueError(f"{item!r} is not an IP address or network") from exc
        return value

    @model_validator(mode="after")
    def _check_auth_binding(self) -> Settings:
        if not self.auth and not self.is_loopback:
            raise ValueError(
                "LEGATOR_AUTH=false is only allowed when LEGATOR_ADDR is a loopback address"
            )
        if self.nats_url is not None and self.signing_key is None:
            raise ValueError(
                "LEGATOR_NATS_URL needs LEGATOR_SIGNING_KEY, the same on every replica: "
                "probe keys and cluster messages are derived from it"
            )
        self._check_oidc_complete()
        if self.jobs_retry_initial_backoff_s > self.jobs_retry_max_backoff_s:
            raise ValueError(
                "LEGATOR_JOBS_RETRY_INITIAL_BACKOFF_S must not exceed "
                "LEGATOR_JOBS_RETRY_MAX_BACKOFF_S"
            )
        return self

    def _check_oidc_complete(self) -> None:
        """Single sign-on is on when the issuer, client id and redirect URL are all set; some
        without the others is a mistake worth stopping for."""
        required = {
            "LEGATOR_OIDC_ISSUER": self.oidc_issuer,
            "LEGATOR_OIDC_CLIENT_ID": self.oidc_client_id,
            "LEGATOR_OIDC_REDIRECT_URL": self.oidc_redirect_url,
        }
        given = [name for name, value in required.items() if value]
        if self.oidc_client_secret is not None:
            given.append("LEGATOR_OIDC_CLIENT_SECRET")
        missing = [name for name, value in required.items() if not value]
        if given and missing:
            raise ValueError(
                f"{missing[0]}: must be set for single sign-on, since {given[0]} is set "
                "(OIDC needs LEGATOR_OIDC_ISSUER, LEGATOR_OIDC_CLIENT_ID and "
                "LEGATOR_OIDC_REDIRECT_URL)"
            )

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer and self.oidc_client_id and self.oidc_redirect_url)

    @cached_property
    def host(self) -> str:
        host = self.addr.rpartition(":")[0].strip("[]")
        return host or "0.0.0.0"  # noqa: S104 - ':PORT' means every interface, as documented

    @cached_property
    def port(self) -> int:
        return int(self.addr.rpartition(":")[2])

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        if self.data_dir is not None:
            return f"sqlite+aiosqlite:///{self.data_dir.resolve() / 'legator.db'}"
        return "sqlite+aiosqlite://"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")


def _variable_for(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else ""
    return ENV_PREFIX + field.upper() if field else "configuration"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with CLI overrides; raise ConfigError on bad input."""
    clean = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"]:
            raise ConfigError(f"{_variable_for(first['loc'])}: {message}") from None
        raise ConfigError(message) from None
