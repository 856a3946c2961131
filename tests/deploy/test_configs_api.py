"""Control-plane side: catalogue, validated config versions, diff, rendered files, manifest."""

from __future__ import annotations

import hashlib
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from legator.deploy import configs
from legator.deploy.catalog.registry import CATALOG
from legator.deploy.configs import MAX_DIFF_LINES, Summary, bounded_diffs, summarise
from legator.deploy.models import DeployConfig
from legator.deploy.quadlet.check import conflicts_dir, validate_dir
from legator.deploy.render import render
from legator.deploy.spec import (
    MAX_OPTIONS,
    MAX_SERVICES,
    MAX_SPEC_BYTES,
    SpecError,
    validate_spec,
)
from tests.support import LiveServer

ALL = {name: {} for name in CATALOG}
VARIANTS = [
    {"openwebui": {"database": "postgres"}, "litellm": {"database": "postgres", "cache": True}},
    {"openwebui": {"port": None, "enable_signup": True}, "whisper": {"engine": "openai_whisper"}},
    {"llamacpp": {"gpu_layers": 99, "context": 8192, "memory": "8g", "command": "--verbose"}},
    {"llamacpp@coder": {"port": 8091}, "llamacpp@chat": {"port": None}},
    {"redis": {"port": 16379, "bind": "::1"}},  # PublishPort=[::1]:16379:6379
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
        # A line break in any option would add a directive of the caller's to the unit file.
        (
            {"redis": {"port": 16379, "bind": "127.0.0.1\nExecStartPre=/bin/sh -c id\n#"}},
            "services.redis.bind",
        ),
        ({"redis": {"bind": "localhost"}}, "services.redis.bind"),
        ({"redis": {"image": "docker.io/library/redis:7\n"}}, "services.redis.image"),
        ({"llamacpp": {"command": "--verbose\rExecStartPre=id"}}, "services.llamacpp.command"),
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


# --- Bounds: a configuration's size, and the CPU a save, listing or diff may cost ---

CONFIGS = "/api/v1/deploy/configs"


def many(count: int, context: int = 4096) -> dict[str, dict[str, Any]]:
    """``count`` llama.cpp instances, internal only (no port clashes), four options each: six
    lines of spec JSON per service."""
    return {
        f"llamacpp@m{i}": {"port": None, "memory": "8g", "context": context, "gpu_layers": i % 7}
        for i in range(count)
    }


def test_too_many_services_are_refused_naming_the_limit(api: httpx.Client) -> None:
    refused = api.post(CONFIGS, json={"spec": {"services": many(MAX_SERVICES + 1)}})
    assert refused.status_code == 422
    error = refused.json()["error"]
    limit = f"at most {MAX_SERVICES} services per configuration, got {MAX_SERVICES + 1}"
    assert error["message"] == f"body.spec.services: {limit}"
    # The audit's payload: ~1 MiB, 28k services. Refused as cheaply, before any entry is read.
    huge = {f"llamacpp@m{i}": {"port": None} for i in range(28_000)}
    assert api.post(CONFIGS, json={"spec": {"services": huge}}).status_code == 422
    assert api.get(CONFIGS).json() == []
    at_limit = api.post(CONFIGS, json={"spec": {"services": many(MAX_SERVICES)}})
    assert at_limit.status_code == 201, at_limit.text
    assert len(at_limit.json()["services"]) == MAX_SERVICES


@pytest.mark.parametrize(
    ("services", "message"),
    [
        ({"redis": {f"k{i}": 1 for i in range(MAX_OPTIONS + 1)}}, f"at most {MAX_OPTIONS} items"),
        ({"llamacpp@" + "x" * 100: {}}, "longer than 64 characters"),
        (
            {f"llamacpp@m{i}": {"port": None, "command": "x" * 2000} for i in range(200)},
            f"at most {MAX_SPEC_BYTES // 1024} KiB of JSON per configuration, got 398 KiB",
        ),
    ],
)
def test_options_keys_and_size_are_bounded(
    services: dict[str, object], message: str, api: httpx.Client
) -> None:
    with pytest.raises(SpecError) as caught:
        validate_spec({"services": services})
    assert message in str(caught.value)
    refused = api.post(CONFIGS, json={"spec": {"services": services}})
    assert refused.status_code == 422 and message in refused.json()["error"]["message"]


def test_a_diff_of_large_legal_specs_is_bounded(api: httpx.Client) -> None:
    for context in (4096, 8192):
        saved = api.post(CONFIGS, json={"spec": {"services": many(MAX_SERVICES, context)}})
        assert saved.status_code == 201, saved.text
    diff = api.get(f"{CONFIGS}/1/diff/2").json()
    # ~1500 lines of spec JSON a side, every sixth one changed: not handed to difflib...
    lines = 5 + MAX_SERVICES * 6  # braces, "network", "services" and six lines a service
    assert diff["spec_diff"] == (
        f"Files v1/spec.json and v2/spec.json differ (too large to diff: {lines} and {lines} "
        f"lines, the limit is {MAX_DIFF_LINES})\n"
    )
    # ...while each rendered file is small, and still diffed.
    assert len(diff["changed_files"]) == len(diff["affected_services"]) == MAX_SERVICES
    assert diff["files_diff"].count("+Environment=LLAMA_ARG_CTX_SIZE=8192") == MAX_SERVICES
    assert "differ" not in diff["files_diff"]


def test_diffs_have_a_total_budget() -> None:
    def file(changed: str) -> bytes:
        return "".join(f"line {i}\n" for i in range(900)).encode() + changed.encode()

    old = {name: file("old\n") for name in ("a", "b", "c")}
    new = {name: file("new\n") for name in ("a", "b", "c")}
    (text,) = bounded_diffs([(old, new)], label=("v1", "v2"))
    # 901 x 901 lines twice fit the budget (2 M line pairs); the third file does not.
    assert text.count("+new\n") == 2
    assert text.endswith(
        "Files v1/c and v2/c differ "
        "(not diffed: this diff already compared as much as one diff may)\n"
    )
    assert bounded_diffs([({"x": b"1\n"}, {})], label=("v1", "v2"))[0].startswith(
        "--- v1/x\n+++ /dev/null\n"
    )


@pytest.mark.parametrize("variant", [*VARIANTS, {}])
def test_summaries_match_the_rendered_manifest(variant: dict[str, dict[str, object]]) -> None:
    spec = validate_spec({"services": {**ALL, **variant}})
    manifest = render(spec, version=1, created_at=datetime.now(UTC)).manifest
    assert summarise(spec) == Summary(manifest.services, manifest.secrets_required)


def render_count(api: httpx.Client) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith("legator_deploy_render_seconds_count"):
            return float(line.split()[-1])
    raise AssertionError("no legator_deploy_render_seconds_count")


def test_listing_pages_and_renders_nothing(api: httpx.Client, server: LiveServer) -> None:
    for port in (7001, 7002, 7003):
        api.post(CONFIGS, json={"spec": {"services": {"redis": {"port": port}, "postgres": {}}}})
    server.restart()  # nothing cached: listings read the stored versions
    assert [c["version"] for c in api.get(CONFIGS).json()] == [3, 2, 1]
    page = api.get(CONFIGS, params={"limit": 2}).json()
    assert [c["version"] for c in page] == [3, 2]
    assert page[0]["services"] == ["postgres", "redis"]
    assert page[0]["secrets_required"] == ["postgres-password"]
    rest = api.get(CONFIGS, params={"limit": 2, "before": page[-1]["version"]}).json()
    assert [c["version"] for c in rest] == [1]
    assert api.get(f"{CONFIGS}/latest").json()["services"] == ["postgres", "redis"]
    assert render_count(api) == 0
    assert api.get(CONFIGS, params={"limit": 0}).status_code == 422
    assert api.get(CONFIGS, params={"limit": 101}).status_code == 422
    api.get("/api/v1/deploy/rendered/3/manifest.json")
    assert render_count(api) == 1


def test_versions_saved_before_the_limit_stay_readable(
    api: httpx.Client, server: LiveServer
) -> None:
    api.post(CONFIGS, json={"spec": {"services": many(3)}})

    async def save_oversized() -> None:
        assert server.core is not None
        async with server.core.db.write() as session:
            first = await session.scalar(select(DeployConfig))
            assert first is not None
            services = many(MAX_SERVICES + 44, context=8192)
            session.add(
                DeployConfig(
                    owner=first.owner,
                    version=2,
                    spec={"network": "legator", "services": services},
                    comment="",
                    created_by=first.created_by,
                )
            )

    server.call(save_oversized())
    listed = api.get(CONFIGS).json()
    assert [len(c["services"]) for c in listed] == [MAX_SERVICES + 44, 3]
    diff = api.get(f"{CONFIGS}/1/diff/2").json()
    assert diff["spec_diff"].startswith("Files v1/spec.json and v2/spec.json differ (too large")
    assert len(diff["affected_services"]) == MAX_SERVICES + 44


@pytest.mark.parametrize(
    ("step", "hold"),
    [("save", "validate_spec"), ("render", "render"), ("diff", "unified")],
)
def test_config_work_leaves_the_event_loop_free(
    step: str, hold: str, api: httpx.Client, server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hold one step of a request (validating, rendering, diffing) until another request has
    been answered: that works only if the step runs off the event loop. No timing involved."""
    if step != "save":
        for port in (7001, 7002):
            api.post(CONFIGS, json={"spec": {"services": {"redis": {"port": port}}}})
        server.restart()  # nothing cached
    entered, release = threading.Event(), threading.Event()
    real = getattr(configs, hold)

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(configs, hold, held)
    request = {
        "save": lambda: api.post(CONFIGS, json={"spec": {"services": {"redis": {}}}}),
        "render": lambda: api.get("/api/v1/deploy/rendered/2/manifest.json"),
        "diff": lambda: api.get(f"{CONFIGS}/1/diff/2"),
    }[step]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(request)
        try:
            assert entered.wait(timeout=30), f"{hold} was never called"
            # Blocked loop: no answer until the held step is released (30 s).
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        finally:
            release.set()
        assert pending.result(timeout=30).status_code in (200, 201)
