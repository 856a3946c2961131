"""Wire shapes of the Deploy API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from legator.deploy.spec import DeploySpec


class CatalogSecret(BaseModel):
    name: str
    target: str
    description: str


class CatalogEntry(BaseModel):
    name: str
    title: str
    description: str
    container_port: int
    options_schema: dict[str, Any]
    default_requires: list[str]
    default_secrets: list[CatalogSecret]


class ConfigCreate(BaseModel):
    spec: DeploySpec
    comment: str = Field("", max_length=500)


class ConfigOut(BaseModel):
    version: int
    spec: dict[str, Any]
    comment: str
    created_by: str
    created_at: datetime
    services: list[str]
    secrets_required: list[str]


class ConfigDiff(BaseModel):
    from_version: int
    to_version: int
    spec_diff: str
    files_diff: str
    changed_files: list[str]
    affected_services: list[str]


class DeviceStart(BaseModel):
    client_name: str = Field(
        "", max_length=100, description="Shown to the approver, e.g. a hostname."
    )


class DeviceApprove(BaseModel):
    user_code: str = Field(min_length=8, max_length=16)


class DevicePoll(BaseModel):
    device_code: str = Field(min_length=20, max_length=100)
