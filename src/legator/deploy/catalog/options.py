"""Typed options for each catalogue service. Unknown fields are errors, so a typo is caught."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_IMAGE = re.compile(r"[a-z0-9][a-z0-9._/:@-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Port = Annotated[int, Field(ge=1, le=65535)]


class ServiceOptions(BaseModel):
    """Every string option lands in a unit file, where a line break would start a directive
    of the caller's choosing (``ExecStartPre=``, run on the host) and a trailing backslash
    would continue the line into the next directive (or swallow a section header): none may
    hold a control character or end in a backslash, and each is checked against what it
    names. A ``%`` is escaped when rendered (``render``), so systemd reads it literally."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Fully qualified image reference.")
    port: Port | None = Field(None, description="Host port to publish on; none = internal only.")
    bind: str = Field("127.0.0.1", description="Host address the published port binds to.")
    command: str | None = Field(None, description="Override the image's command.")
    memory: str | None = Field(None, pattern=r"^\d+[kmg]?$", description="Memory limit, e.g. 2g.")

    @field_validator("*", mode="after")
    @classmethod
    def _one_line(cls, value: object) -> object:
        if isinstance(value, str) and _CONTROL.search(value):
            raise ValueError("must not contain line breaks or other control characters")
        if isinstance(value, str) and value.rstrip().endswith("\\"):
            raise ValueError("must not end with a backslash (it would continue the unit line)")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not _IMAGE.fullmatch(value):
            raise ValueError("must be an image reference such as docker.io/library/redis:7")
        return value

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("must be an IP address such as 127.0.0.1 or ::1") from None
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            # `PublishPort=[fe80::1%eth0]:…` is refused by leger's validation.
            raise ValueError("must be an IP address without a %scope (zone) id")
        return str(address)

    @field_validator("command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be one non-empty line")
        return value


class OpenWebUIOptions(ServiceOptions):
    image: str = "ghcr.io/open-webui/open-webui:main"
    port: Port | None = 3000
    database: Literal["sqlite", "postgres"] = "sqlite"
    enable_signup: bool = False


class LiteLLMOptions(ServiceOptions):
    image: str = "ghcr.io/berriai/litellm:main-stable"
    port: Port | None = 4000
    database: Literal["none", "postgres"] = "none"
    cache: bool = Field(False, description="Use Redis as the response cache.")


class PostgresOptions(ServiceOptions):
    image: str = "docker.io/library/postgres:16"
    database: str = Field("app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    user: str = Field("app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")


class RedisOptions(ServiceOptions):
    image: str = "docker.io/library/redis:7"
    maxmemory: str = Field("256mb", pattern=r"^\d+(kb|mb|gb)$")


class SearXNGOptions(ServiceOptions):
    image: str = "docker.io/searxng/searxng:latest"
    port: Port | None = 8888
    # No quotes: the generator unquotes ``Environment=`` values, so they would vanish.
    base_url: str = Field("http://localhost:8888/", pattern=r"^https?://[^\s\"']+$")


class WhisperOptions(ServiceOptions):
    image: str = "docker.io/onerahmet/openai-whisper-asr-webservice:latest"
    port: Port | None = 9000
    model: Literal["tiny", "base", "small", "medium", "large-v3"] = "base"
    engine: Literal["openai_whisper", "faster_whisper"] = "faster_whisper"


class JupyterOptions(ServiceOptions):
    image: str = "quay.io/jupyter/minimal-notebook:latest"
    port: Port | None = 8889


class LlamaCppOptions(ServiceOptions):
    image: str = "ghcr.io/ggml-org/llama.cpp:server"
    port: Port | None = 8081
    model_path: str = Field("/models/model.gguf", pattern=r"^/[^\s\"']+\.gguf$")
    context: int = Field(4096, ge=256, le=1_048_576)
    gpu_layers: int = Field(0, ge=0, le=1000)
