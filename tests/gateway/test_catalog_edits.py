"""Category edits and identifiers: a trailing newline is not part of a valid name, a null
description leaves it as it is, an unknown preferred model is a bad value."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from legator.fleet.schemas import check_tags
from legator.gateway.schemas import CategoryIn, ModelCreate


@pytest.mark.parametrize("name", ["m\n", "m\r\n", "\nm"])
def test_a_newline_is_never_part_of_an_identifier(name: str) -> None:
    # Python's `$` also matches before a final newline: "m\n" passed as "m"'s twin.
    with pytest.raises(ValidationError):
        ModelCreate(id=name, backend_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValidationError):
        CategoryIn(name=name)
    with pytest.raises(ValueError):
        check_tags([name])


def test_a_model_id_with_a_newline_is_refused_live(admin: httpx.Client) -> None:
    created = admin.post(
        "/api/v1/gateway/models", json={"id": "m\n", "backend_url": "http://127.0.0.1:9/v1"}
    )
    assert created.status_code == 422, created.text
    assert admin.post("/api/v1/gateway/categories", json={"name": "c\n"}).status_code == 422


def test_category_edits(admin: httpx.Client) -> None:
    url = "/api/v1/gateway/categories"
    created = admin.post(url, json={"name": "code", "description": "d", "preferred_model": ""})
    assert created.status_code == 201, created.text
    assert created.json()["preferred_model"] is None
    kept = admin.patch(f"{url}/code", json={"description": None})
    assert kept.status_code == 200, kept.text
    assert kept.json()["description"] == "d"
    for body in ({"preferred_model": "nope"}, {"name": "other", "preferred_model": "nope"}):
        method = admin.patch if "name" not in body else admin.post
        refused = method(url + ("/code" if "name" not in body else ""), json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["message"] == "preferred_model: model 'nope' does not exist"
    admin.patch(f"{url}/code", json={"preferred_model": "echo"})
    cleared = admin.patch(f"{url}/code", json={"preferred_model": ""})
    assert cleared.json()["preferred_model"] is None


@pytest.mark.parametrize("directory", ["/srv/models:v2", "/srv/a,b"])
def test_a_podman_model_directory_podman_cannot_mount_is_refused(directory: str) -> None:
    with pytest.raises(ValidationError, match="cannot have ':' or ','"):
        ModelCreate(id="m", backend_kind="podman", model_path=f"{directory}/m.gguf")
    # A process backend reads the path as it is; a comma in the file's own name is mounted fine.
    ModelCreate(id="m", backend_kind="process", model_path=f"{directory}/m.gguf")
    ModelCreate(id="m", backend_kind="podman", model_path="/srv/models/m,q4.gguf")
