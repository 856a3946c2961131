"""The ``legator`` fleet commands against a real control plane and probe."""

from __future__ import annotations

import json

import httpx

from tests.support import LiveServer, run_cli


def _env(server: LiveServer) -> dict[str, str]:
    return {"LEGATOR_SERVER_URL": server.url, "LEGATOR_API_KEY": server.admin_key}


def test_fleet_cli(fleet_server: LiveServer, admin: httpx.Client, spawn_probe) -> None:  # type: ignore[no-untyped-def]
    env = _env(fleet_server)
    created = run_cli("legator", "tokens", "create", "--json", env=env)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["token"].startswith("prb_")
    plain = run_cli("legator", "tokens", "create", env=env)
    assert plain.stdout.startswith("export LEGATOR_TOKEN=prb_") and "install.sh" in plain.stdout
    tokens = json.loads(run_cli("legator", "tokens", "list", "--json", env=env).stdout)
    assert len(tokens) == 2 and all("token" not in t for t in tokens)
    first = json.loads(created.stdout)
    table = run_cli("legator", "tokens", "list", env=env).stdout
    assert first["id"] in table and first["token"] not in table
    assert run_cli("legator", "tokens", "delete", first["id"], env=env).returncode == 0
    assert run_cli("legator", "tokens", "delete", first["id"], env=env).returncode == 3

    probe = spawn_probe("cli-a", tags="blue", max_level="remediate", policy="unattended")
    rebind = run_cli("legator", "tokens", "create", "--probe", probe.probe_id, env=env)
    assert rebind.returncode == 0 and f"re-enrols probe {probe.probe_id}" in rebind.stderr
    assert probe.probe_id in run_cli("legator", "tokens", "list", env=env).stdout
    listed = json.loads(run_cli("legator", "probes", "list", "--json", env=env).stdout)
    assert [p["id"] for p in listed] == [probe.probe_id]
    table = run_cli("legator", "probes", "list", env=env)
    assert "cli-a" in table.stdout
    shown = json.loads(
        run_cli("legator", "probes", "show", probe.probe_id, "--json", env=env).stdout
    )
    assert shown["hostname"] == "cli-a" and 0 <= shown["health"]["score"] <= 100
    assert run_cli("legator", "probes", "show", "prb-00000000", env=env).returncode == 3

    streamed = run_cli(
        "legator",
        "run",
        probe.probe_id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
        env=env,
    )
    assert streamed.returncode == 7
    assert streamed.stdout == "out\n" and "err" in streamed.stderr
    as_json = run_cli("legator", "run", "--json", probe.probe_id, "--", "uname", env=env)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["stdout"] == "Linux\n"
    fan = run_cli("legator", "run", "--tag", "blue", "--json", "--", "hostname", env=env)
    assert fan.returncode == 0 and json.loads(fan.stdout)["targets"] == 1
    fan_table = run_cli("legator", "run", "--tag", "blue", "--", "hostname", env=env)
    assert "cli-a" in fan_table.stdout
    assert run_cli("legator", "run", probe.probe_id, env=env).returncode == 2
    no_key = run_cli("legator", "probes", "list", env={"LEGATOR_SERVER_URL": fleet_server.url})
    assert no_key.returncode == 2 and "API key" in no_key.stderr
    assert run_cli("legator", "probes", "delete", probe.probe_id, env=env).returncode == 0
    assert run_cli("legator", "probes", "delete", probe.probe_id, env=env).returncode == 3


def test_api_key_flag_is_refused() -> None:
    """A key in the arguments would show in `ps`: `--api-key` is refused wherever it stands,
    before any request (nothing listens on port 9), with a pointer to the variable."""
    env = {"LEGATOR_SERVER_URL": "http://127.0.0.1:9", "LEGATOR_API_KEY": ""}
    for args in (
        ["probes", "list", "--api-key", "lgk_" + "0" * 64],
        ["approvals", "approve", "apr-1", "--api-key=lgk_x"],
        ["--api-key", "lgk_x", "models", "list"],
        ["chat", "prb-1", "-m", "hi", "--api-key", "lgk_x"],
    ):
        refused = run_cli("legator", *args, env=env)
        assert refused.returncode == 2 and not refused.stdout, (args, refused.stderr)
        assert "--api-key is not accepted" in refused.stderr, refused.stderr
        assert "set LEGATOR_API_KEY" in refused.stderr
    assert "--api-key" not in run_cli("legator", "probes", "list", "--help").stdout
