"""The probe keeps its own secrets, whatever policy the control plane pushes: file operations
never serve its ``probe.yaml`` nor a process's environment or memory, and commands never
inherit its ``LEGATOR_*`` variables."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from legator.cli.probe import app
from legator.fleet.protocol import CommandSpec, FileRequest
from legator.probe import fileops
from legator.probe.config import ProbeConfig, save
from legator.probe.executor import Executor


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "etc-legator" / "probe.yaml"
    config = ProbeConfig(
        server="http://127.0.0.1:9",
        probe_id="prb-0011aabb",
        api_key="lpk_" + "k" * 40,
        signing_key="ab" * 32,
    )
    save(config, path)
    return path


def _read(path: str | Path, roots: list[str], config: Path, op: str = "read"):  # type: ignore[no-untyped-def]
    request = FileRequest(request_id="r1", op=op, path=str(path), pattern="x")  # type: ignore[arg-type]
    return fileops.perform(request, roots, config)


@pytest.mark.parametrize("op", ["read", "readlines", "search", "stat"])
def test_own_config_is_refused_even_when_the_policy_allows_it(tmp_path: Path, op: str) -> None:
    config = _config(tmp_path)
    (config.parent / "notes.txt").write_text("harmless\n")
    with pytest.raises(fileops.FileDenied, match="probe's own credentials file"):
        _read(config, ["/"], config, op)
    # the rest of the directory is an ordinary allowed path
    assert _read(config.parent / "notes.txt", [str(tmp_path)], config)["content"] == "harmless\n"


def test_symlink_dotdot_hard_link_and_tmp_sibling_are_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link").symlink_to(config)
    (allowed / "dirlink").symlink_to(config.parent)
    os.link(config, allowed / "hard")
    config.with_suffix(".tmp").write_text("api_key: lpk_next\n")  # a key rotation midway
    for path in (
        allowed / "link",
        f"{allowed}/dirlink/probe.yaml",
        f"{allowed}/../etc-legator/./probe.yaml",
        allowed / "hard",
        config.with_suffix(".tmp"),
    ):
        with pytest.raises(fileops.FileDenied, match="credentials file"):
            _read(path, [str(tmp_path)], config)


def test_default_location_is_refused_without_a_config_path(tmp_path: Path) -> None:
    request = FileRequest(request_id="r1", op="read", path="/etc/legator/probe.yaml")
    with pytest.raises(fileops.FileDenied, match="credentials file"):
        fileops.perform(request, ["/etc"])


@pytest.mark.parametrize(
    "path",
    [
        "/proc/self/environ",
        "/proc/thread-self/environ",
        f"/proc/{os.getpid()}/environ",
        f"/proc/{os.getpid()}/task/{os.getpid()}/environ",
        "/proc/self/mem",
        "/proc/self/pagemap",
        "/proc/kcore",
        "/proc/self/root/proc/self/environ",
    ],
)
def test_process_environment_and_memory_are_refused(tmp_path: Path, path: str) -> None:
    config = _config(tmp_path)
    with pytest.raises(fileops.FileDenied, match="environment or memory"):
        _read(path, ["/proc", "/"], config)


def test_other_proc_files_stay_readable(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert "python" in _read("/proc/self/cmdline", ["/proc"], config)["content"]
    assert _read("/proc/self/status", ["/proc"], config)["content"].startswith("Name:")


def test_what_was_opened_is_checked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path swapped between the check and the open (a race) is caught on the open file."""
    config = _config(tmp_path)
    monkeypatch.setattr(fileops, "check_not_secret", lambda *args: None)
    with pytest.raises(fileops.FileDenied, match="credentials file"):
        _read(config, ["/"], config)
    with pytest.raises(fileops.FileDenied, match="environment or memory"):
        _read("/proc/self/environ", ["/proc"], config, "readlines")


def test_commands_get_no_legator_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEGATOR_TOKEN", "prb_" + "a1" * 24)
    monkeypatch.setenv("LEGATOR_SERVER_URL", "https://cp.example")
    monkeypatch.setenv("legator_lower", "x")
    monkeypatch.setenv("KEPT_FROM_PROBE", "kept")
    spec = CommandSpec(request_id="r1", command="printenv", env={"MINE": "mine"})
    result = asyncio.run(Executor().run(spec))
    assert result.status == "completed"
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.upper().startswith("LEGATOR_")], lines
    assert "MINE=mine" in lines and "KEPT_FROM_PROBE=kept" in lines


def test_run_drops_the_enrolment_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    seen: dict[str, str | None] = {}

    async def fake_run_forever(self) -> None:  # type: ignore[no-untyped-def]
        seen["token"] = os.environ.get("LEGATOR_TOKEN")

    monkeypatch.setattr("legator.probe.agent.Agent.run_forever", fake_run_forever)
    monkeypatch.setenv("LEGATOR_TOKEN", "prb_" + "b2" * 24)
    done = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert seen == {"token": None}
    assert "LEGATOR_TOKEN" not in os.environ
