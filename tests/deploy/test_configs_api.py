"""Control-plane side: catalogue, validated config versions, diff, rendered files, manifest."""

from __future__ import annotations

import hashlib
import itertools
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from legator.deploy.catalog.registry import CATALOG
from legator.deploy.quadlet.check import conflicts_dir, validate_dir
from legator.deploy.render import render
from legator.deploy.spec import SpecError, validate_spec

ALL = {name: {} for name in CATALOG}
VARIANTS = [
    {"openwebui": {"database": "postgres"}, "litellm": {"database": "postgres", "cache": True}},
    {"openwebui": {"port": None, "enable_signup": True}, "whisper": {"engine": "openai_whisper"}},
    {"llamacpp": {"gpu_layers": 99, "context": 8192, "memory": "8g", "command": "--verbose"}},
    {"llamacpp@coder": {"port": 8091}, "llamacpp@chat": {"port": None}},
]


@pytest.mark.parametrize("variant", [*VARIANTS, {}])
def test_every_template_passes_the_real_generator(
    variant: dict[str, dict[str, object]], tmp_path: Path, generator: str
) -> None:
    spec = validate_spec({"services": {**ALL, **variant}})
    rendered = render(spec, version=1, created_at=datetime.now(UTC))
    for name, data in rendered.files.items():
        (tmp_path / name).write_bytes(data)
    report = validate_dir(tmp_path)
    assert report.generator == generator
    assert [str(f) for f in report.findings if f.level == "error"] == []
    assert conflicts_dir(tmp_path, check_host_ports=False).ok
    instances = sum("@" in key for key in variant)
    assert len(report.units) == 2 * (len(CATALOG) + instances) + 1


def test_each_service_alone_with_its_dependencies(tmp_path: Path, generator: str) -> None:
    for name, template in CATALOG.items():
        deps = template.requires(template.options())
        spec = validate_spec({"services": {name: {}, **{d: {} for d in deps}}})
        directory = tmp_path / name
        directory.mkdir()
        for path, data in render(spec, version=1, created_at=datetime.now(UTC)).files.items():
            (directory / path).write_bytes(data)
        assert validate_dir(directory).ok, name


@pytest.mark.parametrize(
    ("services", "field"),
    [
        ({"redis": {"port": 70000}}, "services.redis.port"),
        ({"redis": {"colour": "blue"}}, "services.redis.colour"),
        ({"nosuch": {}}, "services.nosuch"),
        ({"openwebui": {}}, "services.openwebui"),  # needs litellm
        ({"jupyter": {"port": 9000}, "whisper": {}}, "services.whisper.port"),
        ({"redis": {"image": "Not An Image"}}, "services.redis.image"),
        ({"llamacpp": {"model_path": "relative.gguf"}}, "services.llamacpp.model_path"),
        ({"llamacpp@Big!": {}}, "services.llamacpp@Big!"),
        ({"redis@two": {"port": 7000}, "whisper@x": {"port": 7000}}, "services.whisper@x.port"),
    ],
)
def test_spec_errors_name_the_field(services: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        validate_spec({"services": services})
    assert field in [e["field"] for e in caught.value.errors]


def test_dependency_order() -> None:
    spec = validate_spec({"services": VARIANTS[0] | {"postgres": {}, "redis": {}}})
    order = render(spec, version=1, created_at=datetime.now(UTC)).manifest.services
    for before, after in itertools.product(["postgres", "redis"], ["litellm", "openwebui"]):
        assert order.index(before) < order.index(after)
    assert order.index("litellm") < order.index("openwebui")


def test_catalogue(api: httpx.Client) -> None:
    entries = {e["name"]: e for e in api.get("/api/v1/deploy/catalog").json()}
    assert set(entries) >= {
        "openwebui",
        "litellm",
        "postgres",
        "redis",
        "searxng",
        "whisper",
        "jupyter",
        "llamacpp",
    }
    assert entries["openwebui"]["default_requires"] == ["litellm"]
    assert entries["postgres"]["options_schema"]["properties"]["port"]
    assert {s["target"] for s in entries["openwebui"]["default_secrets"]} >= {"WEBUI_SECRET_KEY"}


def test_versions_render_and_diff(api: httpx.Client) -> None:
    assert api.get("/api/v1/deploy/configs/latest").status_code == 404
    bad = api.post("/api/v1/deploy/configs", json={"spec": {"services": {"redis": {"port": 0}}}})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"].startswith("invalid configuration: services.redis.port")
    first = api.post("/api/v1/deploy/configs", json={"spec": {"services": {"redis": {}}}})
    assert first.status_code == 201 and first.json()["version"] == 1
    second = api.post(
        "/api/v1/deploy/configs",
        json={"spec": {"services": {"redis": {"port": 16379}, "postgres": {}}}, "comment": "more"},
    )
    assert second.json()["version"] == 2
    assert second.json()["secrets_required"] == ["postgres-password"]
    assert [c["version"] for c in api.get("/api/v1/deploy/configs").json()] == [2, 1]
    assert api.get("/api/v1/deploy/configs/latest").json()["version"] == 2

    manifest = api.get("/api/v1/deploy/rendered/latest/manifest.json").json()
    assert manifest["version"] == 2 and manifest["services"] == ["postgres", "redis"]
    for entry in manifest["files"]:
        body = api.get(f"/api/v1/deploy/rendered/2/{entry['path']}").content
        assert hashlib.sha256(body).hexdigest() == entry["sha256"] and len(body) == entry["size"]
    assert api.get("/api/v1/deploy/rendered/2/nope.container").status_code == 404
    assert api.get("/api/v1/deploy/rendered/9/manifest.json").status_code == 404
    assert api.get("/api/v1/deploy/configs/abc").status_code == 400

    diff = api.get("/api/v1/deploy/configs/1/diff/2").json()
    assert diff["affected_services"] == ["postgres", "redis"]
    assert "+PublishPort=127.0.0.1:16379:6379" in diff["files_diff"]
    assert '+      "port": 16379' in diff["spec_diff"]


def test_versions_are_per_user_and_need_permissions(api: httpx.Client, make_user) -> None:  # type: ignore[no-untyped-def]
    api.post("/api/v1/deploy/configs", json={"spec": {"services": {"redis": {}}}})
    operator = make_user("operator")
    assert operator.get("/api/v1/deploy/configs").json() == []
    created = operator.post("/api/v1/deploy/configs", json={"spec": {"services": {"redis": {}}}})
    assert created.json()["version"] == 1
    viewer = make_user("viewer")
    assert viewer.get("/api/v1/deploy/catalog").status_code == 200
    denied = viewer.post("/api/v1/deploy/configs", json={"spec": {"services": {"redis": {}}}})
    assert denied.status_code == 403


def test_concurrent_saves_get_distinct_versions_and_are_counted(api: httpx.Client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def save(i: int) -> int:
        body = {"spec": {"services": {"redis": {"port": 20000 + i}}}}
        response = api.post("/api/v1/deploy/configs", json=body)
        assert response.status_code == 201, response.text
        return int(response.json()["version"])

    with ThreadPoolExecutor(max_workers=5) as pool:
        versions = sorted(pool.map(save, range(5)))
    assert versions == [1, 2, 3, 4, 5]
    metrics = api.get("/metrics").text
    assert "legator_deploy_configs_saved_total 5.0" in metrics
    assert "legator_deploy_render_seconds_count" in metrics
