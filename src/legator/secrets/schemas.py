"""Request and response bodies of the control plane's ``/api/v1/secrets`` mount: setec's own
JSON field names, so the same client speaks to legerd and to the control plane."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Setec(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ListIn(_Setec):
    pass


class NameIn(_Setec):
    Name: str = Field(..., description="Secret name: 1-512 printable ASCII bytes.")


class GetIn(NameIn):
    Version: int = Field(0, ge=0, description="0 or absent: the active version.")
    UpdateIfChanged: bool = Field(
        False, description="With Version: answer 304 while the active version is Version."
    )


class PutIn(NameIn):
    Value: str = Field(..., description="The value, base64.")


class VersionIn(NameIn):
    Version: int = Field(..., ge=0)


class CreateVersionIn(VersionIn):
    Value: str = Field(..., description="The value, base64.")


class SecretInfoOut(BaseModel):
    Name: str
    Versions: list[int]
    ActiveVersion: int


class SecretValueOut(BaseModel):
    Value: str = Field(..., description="The value, base64.")
    Version: int
