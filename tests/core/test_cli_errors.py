"""The `legator` CLI's errors against a server that is down, or that is not the control plane
(a sign-in proxy's HTML page, a redirect, a stream broken off): one line and exit 1, never a
traceback. Also `models rm --force`, whole ids in narrow tables, validation messages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError
from rich.console import Console

from legator.cli import common
from tests.fake_proxy import closed_url, fake_proxy
from tests.support import LiveServer, live_server, one_line_error, run_cli

KEY = {"LEGATOR_API_KEY": "lgk_" + "0" * 64}

# Every way the online commands talk HTTP: call(), client() with check(), a stream, raw text.
COMMANDS = [
    ("task", "prb-nope", "do x"),
    ("probes", "list"),
    ("tokens", "create"),
    ("models", "rm", "m"),
    ("backends", "logs", "m"),
    ("approvals", "list"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_server_out_of_reach_is_one_line(args: tuple[str, ...]) -> None:
    url = closed_url()
    line = one_line_error(run_cli("legator", *args, "--server", url, env=KEY))
    assert line.startswith(f"error: cannot reach {url}: ")
    assert "refused" in line.lower()


def test_an_html_page_or_a_redirect_is_not_json_nor_a_traceback() -> None:
    with fake_proxy() as url:
        for args in COMMANDS:
            line = one_line_error(run_cli("legator", *args, "--server", url, env=KEY))
            assert line.startswith(f"error: {url} did not answer with "), line
            assert "(an HTML page: a proxy in front?)" in line
        redirected = run_cli("legator", "probes", "list", "--server", url + "/redirect", env=KEY)
        line = one_line_error(redirected)
        assert "redirect to https://sso.example/login" in line


def test_a_stream_broken_off_is_one_line() -> None:
    with fake_proxy() as url:
        result = run_cli("legator", "run", "prb-1", "--server", url, "--", "uptime", env=KEY)
    assert one_line_error(result).startswith(f"error: cannot reach {url}: ")


@pytest.fixture
def gateway(tmp_path: Path):  # type: ignore[no-untyped-def]
    with live_server(tmp_path / "data") as server:
        yield server


def test_models_rm_force_revokes_the_pinned_keys(gateway: LiveServer) -> None:
    env = {"LEGATOR_API_KEY": gateway.admin_key}
    with gateway.client(gateway.admin_key) as api:
        created = api.post(
            "/api/v1/gateway/models", json={"id": "pinned", "backend_url": "http://127.0.0.1:9"}
        )
        assert created.status_code == 201, created.text
        pinned = api.post("/api/v1/gateway/keys", json={"user": "admin", "model": "pinned"})
        assert pinned.status_code == 201, pinned.text
        prefix = pinned.json()["key"][:12]
        refused = run_cli("legator", "models", "rm", "pinned", "--server", gateway.url, env=env)
        line = one_line_error(refused, 4)
        assert prefix in line and "legator models rm pinned --force" in line
        assert "force=true" not in line
        forced = run_cli(
            "legator", "models", "rm", "pinned", "--force", "--server", gateway.url, env=env
        )
        assert forced.returncode == 0, forced.stderr
        assert api.get("/api/v1/gateway/models/pinned").status_code == 404
        keys = {k["prefix"]: k for k in api.get("/api/v1/keys").json()}
        assert keys[prefix]["revoked_at"] is not None


def narrow_table(monkeypatch: pytest.MonkeyPatch, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    console = Console(file=out, width=80, no_color=True, highlight=False)
    monkeypatch.setattr(common, "console", console)
    common.print_table(*args, **kwargs)
    return out.getvalue()


def test_tables_never_cut_ids_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    key_id, prefix = "66cf8331-0c1f-4a59-9f1e-2c1f5be5d2a4", "lgk_a16b93c2"
    rows = [
        (key_id, prefix, "alice", "deploy key for host", "deploy:read", "active", "2027-01-06"),
        ("0f5ba547-98a5-44bf-9a8f-d19d668e1f4f", "lgk_6eac5101", "ops", "cli", "*", "active", "-"),
    ]
    columns = ["id", "prefix", "user", "name", "scopes", "state", "expires"]
    text = narrow_table(monkeypatch, "API keys", columns, rows)
    assert key_id in text and prefix in text and "deploy key for host" in text
    # A table whose ids fit keeps to the terminal: the other columns give way.
    probes = [
        ("prb-51a7a0c2d4e6f8a1", "a-rather-long-hostname.example.internal", "online", "x" * 60)
    ]
    text = narrow_table(monkeypatch, "probes", ["id", "hostname", "status", "tags"], probes)
    assert "prb-51a7a0c2d4e6f8a1" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_the_keys_listing_shows_whole_ids_in_80_columns(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    created = run_cli("legator", "users", "create", "ops", *data)
    assert created.returncode == 0, created.stderr
    for name in ("first", "a key with a long name for a host"):
        made = run_cli("legator", "keys", "create", "--user", "ops", "--name", name, *data)
        assert made.returncode == 0, made.stderr
    keys = json.loads(run_cli("legator", "keys", "list", "--json", *data).stdout)
    listing = run_cli("legator", "keys", "list", *data, env={"COLUMNS": "80"})
    assert listing.returncode == 0, listing.stderr
    for key in keys:
        assert key["id"] in listing.stdout and key["prefix"] in listing.stdout
    assert "…" not in "".join(
        line.split("│")[1] for line in listing.stdout.splitlines() if line.startswith("│")
    )


class _Account(BaseModel):
    username: str = Field(min_length=3)
    password: str = Field(min_length=12)


def test_validation_message_names_every_field() -> None:
    with pytest.raises(ValidationError) as info:
        _Account(username="a", password="short")
    message = common.validation_message(info.value)
    assert message.startswith("username: ") and "; password: " in message
    assert "at least 12 characters" in message and "\n" not in message
    assert common.validation_message(ValueError("plain\nsecond line")) == "plain"
