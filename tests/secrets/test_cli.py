"""`leger secrets …` and `legerd` as an operator runs them, against a real legerd."""

from __future__ import annotations

import json
from pathlib import Path

from tests.secrets.conftest import LegerdThread
from tests.support import run_cli


def leger(server: LegerdThread, *args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return run_cli("leger", "secrets", "--server", server.url or "", *args, input=input)


def test_secrets_commands(tmp_path: Path, dev_legerd: LegerdThread) -> None:
    put = leger(dev_legerd, "put", "app/db", input="hunter2\n")
    assert put.returncode == 0, put.stderr
    assert "version 1" in put.stdout and "hunter2" not in put.stdout + put.stderr
    value_file = tmp_path / "value"
    value_file.write_text("  second  \n")
    assert leger(dev_legerd, "put", "app/db", "--from-file", str(value_file)).returncode == 0
    got = leger(dev_legerd, "get", "app/db")
    assert (got.returncode, got.stdout) == (0, "hunter2")
    assert leger(dev_legerd, "get", "app/db", "--version", "2").stdout == "second"
    unchanged = leger(dev_legerd, "get", "app/db", "--version", "1", "--if-changed")
    assert (unchanged.returncode, unchanged.stdout) == (0, "")
    assert leger(dev_legerd, "activate", "app/db", "2").returncode == 0
    info = json.loads(leger(dev_legerd, "info", "app/db", "--json").stdout)
    assert info == {"Name": "app/db", "Versions": [1, 2], "ActiveVersion": 2}
    listed = json.loads(leger(dev_legerd, "list", "--json").stdout)
    assert [s["Name"] for s in listed] == ["app/db"]
    table = leger(dev_legerd, "list")
    assert "app/db" in table.stdout and "1,2" in table.stdout

    refused = leger(dev_legerd, "delete-version", "app/db", "1")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert leger(dev_legerd, "delete-version", "app/db", "1", "--yes").returncode == 0
    active = leger(dev_legerd, "delete-version", "app/db", "2", "--yes")
    assert active.returncode == 2 and "active" in active.stderr
    assert leger(dev_legerd, "delete", "app/db", "--yes").returncode == 0
    missing = leger(dev_legerd, "get", "app/db")
    assert missing.returncode == 3 and "not found" in missing.stderr


def test_secrets_command_errors(dev_legerd: LegerdThread) -> None:
    assert leger(dev_legerd, "put", "_internal/x", input="v\n").returncode == 2
    assert leger(dev_legerd, "put", "empty", input="").returncode == 2
    down = run_cli("leger", "secrets", "--server", "http://127.0.0.1:9", "list")
    assert down.returncode == 1 and "cannot reach" in down.stderr
    via_socket = run_cli(
        "leger", "secrets", "--socket", str(dev_legerd.config.socket_path), "put", "s", input="v"
    )
    assert via_socket.returncode == 0, via_socket.stderr


def test_legerd_flags_are_checked(tmp_path: Path) -> None:
    assert run_cli("legerd", "--help").returncode == 0
    bad = run_cli("legerd", "serve", "--state-dir", str(tmp_path), "--listen", "nonsense")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    dev = run_cli("legerd", "serve", "--dev", "--state-dir", str(tmp_path), "--listen", "0.0.0.0:1")
    assert dev.returncode == 2 and "loopback" in dev.stderr
    port = run_cli(
        "legerd", "serve", "--state-dir", str(tmp_path), "--allowed-hosts", "a.example, b:8573"
    )
    assert port.returncode == 2 and "'b:8573'" in port.stderr
    nothing = run_cli("legerd", "rotate-kek", "--state-dir", str(tmp_path / "none"))
    assert nothing.returncode == 3
