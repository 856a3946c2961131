"""Review findings: option values that the unit-file syntax or systemd would read as something
else, and an apply interrupted by SIGTERM. Real quadlet generator, real ``systemd-analyze``
(the systemd package is installed here, only PID 1 is missing), real Podman."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from legator.deploy.render import render
from legator.deploy.spec import SpecError, validate_spec
from legator.deploy.state import Deployments
from tests.deploy.helpers import leger

LEGER = str(Path(sys.executable).parent / "leger")


def rendered_dir(directory: Path, services: dict[str, dict[str, object]]) -> Path:
    spec = validate_spec({"services": services})
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in render(spec, version=1, created_at=datetime.now(UTC)).files.items():
        (directory / name).write_bytes(data)
    return directory


@pytest.mark.parametrize(
    ("services", "field"),
    [
        # `Exec=echo abc \` continued into the next line: the memory limit became an argument.
        ({"redis": {"command": "echo abc \\", "memory": "2g"}}, "services.redis.command"),
        ({"redis": {"command": "echo abc \\ ", "memory": "2g"}}, "services.redis.command"),
        # ... or swallowed `[Service]`, so its keys landed in [Container].
        ({"searxng": {"base_url": "http://x/\\"}}, "services.searxng.base_url"),
        # A scope id: leger's own validation (and Podman) refuse `[fe80::1%eth0]:6379:6379`.
        ({"redis": {"port": 16379, "bind": "fe80::1%eth0"}}, "services.redis.bind"),
    ],
)
def test_options_the_unit_file_would_misread_are_refused(
    services: dict[str, dict[str, object]], field: str
) -> None:
    with pytest.raises(SpecError) as caught:
        validate_spec({"services": services})
    assert field in [e["field"] for e in caught.value.errors]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_a_percent_or_dollar_in_an_option_is_literal_for_systemd(
    tmp_path: Path, generator: str
) -> None:
    """systemd resolves ``%x`` specifiers in ``ExecStart=``: ``a%20b`` in a URL made the unit
    one systemd refuses to load (``Failed to resolve unit specifiers``)."""
    services: dict[str, dict[str, object]] = {
        "searxng": {"base_url": "http://x/a%20b", "command": "sh -c 'echo 100% ${HOME} $X'"},
    }
    source = rendered_dir(tmp_path / "quadlets", services)
    out = tmp_path / "units"
    out.mkdir()
    env = {**os.environ, "QUADLET_UNIT_DIRS": str(source)}
    subprocess.run([generator, "-user", str(out)], env=env, check=True, timeout=30)
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(out / "searxng.service")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{out}:"},
    )
    assert "specifier" not in verify.stderr, verify.stderr
    assert "fatal error" not in verify.stderr, verify.stderr
    unit = (out / "searxng.service").read_text()
    assert "SEARXNG_BASE_URL=http://x/a%%20b" in unit
    # and $ literal too: systemd expands ${VAR} and $VAR in ExecStart=, $$ is one $.
    assert "echo 100%% $${HOME} $$X" in unit


@pytest.mark.parametrize(
    ("services", "field"),
    [
        ({"llamacpp": {"model_path": '/models/a"b.gguf'}}, "services.llamacpp.model_path"),
        ({"llamacpp": {"model_path": "/models/a'b.gguf"}}, "services.llamacpp.model_path"),
        ({"searxng": {"base_url": 'http://x/"a'}}, "services.searxng.base_url"),
    ],
)
def test_quotes_the_generator_would_drop_are_refused(
    services: dict[str, dict[str, object]], field: str
) -> None:
    """``Environment=`` values are unquoted by the generator: ``/models/a"b.gguf`` reached the
    container as ``/models/ab.gguf`` while the configuration said otherwise."""
    with pytest.raises(SpecError) as caught:
        validate_spec({"services": services})
    assert field in [e["field"] for e in caught.value.errors]


def stub_systemctl(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """A ``systemctl`` on PATH: any command COMMAND takes 3 s, writing its pid to
    ``in-COMMAND``, once while ``slow-COMMAND`` exists; ``start`` hangs ``$STUB_SLEEP`` seconds
    (60), writing its pid to ``hanging``, once while ``hang`` exists; ``is-active`` says
    ``failed`` while ``failing`` exists; ``stop`` and ``start`` append their arguments to
    ``stops`` and ``starts``; else it answers at once. Also writes v1, v2 and v3 of a
    one-container source under ``tmp_path``."""
    bin_dir = tmp_path / "stub"
    bin_dir.mkdir()
    hang, hanging, failing = tmp_path / "hang", tmp_path / "hanging", tmp_path / "failing"
    (bin_dir / "systemctl").write_text(
        "#!/bin/sh\n"
        f'if [ -e "{tmp_path}/slow-$2" ]; then rm "{tmp_path}/slow-$2"; '
        f'echo $$ > "{tmp_path}/in-$2"; sleep 3; fi\n'
        f'case "$2" in stop) echo "$@" >> {tmp_path / "stops"};; '
        f'start) echo "$@" >> {tmp_path / "starts"}; '
        f"[ -e {hang} ] && rm {hang} && echo $$ > {hanging} "
        "&& exec sleep ${STUB_SLEEP:-60};; is-active) shift 2; "
        f"for u; do if [ -e {failing} ]; then echo failed; else echo active; fi; done;; "
        "esac\nexit 0\n"
    )
    (bin_dir / "systemctl").chmod(0o755)
    for version in ("1", "2", "3"):
        directory = tmp_path / f"v{version}"
        directory.mkdir()
        (directory / "web.container").write_text(
            f"[Container]\nImage=localhost/x:{version}\n[Install]\nWantedBy=default.target\n"
        )
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}"}


@contextmanager
def hung_in_start(
    tmp_path: Path, env: dict[str, str], *args: str, own_group: bool = False
) -> Iterator[subprocess.Popen[str]]:
    """``leger ARGS`` in the background, yielded once its ``systemctl start`` hangs.
    ``own_group``: in a process group of its own, as a shell runs a foreground command."""
    (tmp_path / "hang").touch()
    hanging = tmp_path / "hanging"
    proc = subprocess.Popen(
        [LEGER, *args],
        env={**os.environ, "NO_COLOR": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0 if own_group else None,
    )
    try:
        deadline = time.monotonic() + 60
        while not (hanging.exists() and hanging.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(hanging.read_text()), signal.SIGKILL)
        hanging.unlink(missing_ok=True)


def test_sigterm_during_an_apply_rolls_back(tmp_path: Path, leger_env: dict[str, str]) -> None:
    """`kill PID` (or a service manager stopping leger) sends SIGTERM: like Ctrl-C, the apply
    must roll back rather than die with the new files installed under the old record."""
    env = stub_systemctl(tmp_path, leger_env)
    first = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v1"))
    assert first.returncode == 0, first.stderr
    with hung_in_start(
        tmp_path, env, "deploy", "install", "demo", "--source", str(tmp_path / "v2")
    ) as proc:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    quadlets = Path(env["LEGER_QUADLET_DIR"])
    assert "Image=localhost/x:1" in (quadlets / "web.container").read_text()
    record = Deployments(Path(env["XDG_DATA_HOME"]) / "leger/deployments.json").get("demo")
    assert record is not None and record.source.endswith("v1")
    assert proc.returncode == 5, err
    assert "terminated by signal 15; rolled back" in err


def test_signals_during_a_rollback_do_not_cut_it_short(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    """A second SIGTERM (a service manager stopping leger again) or a Ctrl-C (SIGINT to the
    whole process group) while an apply rolls back after a first SIGTERM: the rollback was
    abandoned half-way, its `systemctl stop` killed, v2's files left installed under v1's
    record and v1 never started again. Now the rollback finishes."""
    env = stub_systemctl(tmp_path, leger_env)
    first = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v1"))
    assert first.returncode == 0, first.stderr
    stopping = tmp_path / "in-stop"
    with hung_in_start(
        tmp_path, env, "deploy", "install", "demo", "--source", str(tmp_path / "v2"), own_group=True
    ) as proc:
        (tmp_path / "slow-stop").touch()  # the rollback's first step takes 3 s
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not (stopping.exists() and stopping.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    quadlets = Path(env["LEGER_QUADLET_DIR"])
    assert "Image=localhost/x:1" in (quadlets / "web.container").read_text(), err
    assert proc.returncode == 5, err
    assert "terminated by signal 15; rolled back" in err
    record = Deployments(Path(env["XDG_DATA_HOME"]) / "leger/deployments.json").get("demo")
    assert record is not None and record.source.endswith("v1")
    # The rollback's stop ran its course, and v1's service was started again.
    starts = (tmp_path / "starts").read_text().splitlines()
    assert starts == ["--user start web.service"] * 3  # v1, v2 (hung), v1 again
    assert not list((Path(env["XDG_DATA_HOME"]) / "leger").glob(".applying-*"))
    again = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v3"))
    assert again.returncode == 0, again.stderr


def test_an_interrupted_restore_is_noticed_like_an_interrupted_apply(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    """SIGTERM during `backup restore`, after it put the backup's files back but before it
    recorded them: v1's files were installed under v2's record, and nothing said so. The
    next apply went ahead and labelled its backup of v1's files "version 2". Now the next
    apply is refused, naming the backup whose restore was cut short."""
    env = stub_systemctl(tmp_path, leger_env)
    for version in ("v1", "v2"):
        done = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / version))
        assert done.returncode == 0, done.stderr
    backups = json.loads(leger(env, "backup", "list", "--json").stdout)
    before_v2 = next(b["id"] for b in backups if b["version"] == 0)
    (tmp_path / "slow-daemon-reload").touch()  # restore reloads after it swapped the files
    proc = subprocess.Popen(
        [LEGER, "backup", "restore", before_v2],
        env={**os.environ, "NO_COLOR": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reloading = tmp_path / "in-daemon-reload"
    deadline = time.monotonic() + 60
    while not (reloading.exists() and reloading.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    quadlets = Path(env["LEGER_QUADLET_DIR"])
    assert "Image=localhost/x:1" in (quadlets / "web.container").read_text()

    after = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v3"))
    assert after.returncode == 1, (after.returncode, after.stderr)
    assert "was interrupted" in after.stderr and f"leger backup restore {before_v2}" in after.stderr
    assert leger(env, "backup", "restore", before_v2).returncode == 0
    record = Deployments(Path(env["XDG_DATA_HOME"]) / "leger/deployments.json").get("demo")
    assert record is not None and record.version == 0 and record.files == ["web.container"]
    again = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v3"))
    assert again.returncode == 0, again.stderr
    assert "Image=localhost/x:3" in (quadlets / "web.container").read_text()


def test_staging_during_a_staged_apply_is_not_lost(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    """`staged stage` while `staged apply` runs: the apply discarded staged/NAME when it
    finished, which by then held the newer, never applied, update."""
    env = stub_systemctl(tmp_path, leger_env)
    assert leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v1")).returncode == 0
    assert leger(env, "staged", "stage", "demo", "--source", str(tmp_path / "v2")).returncode == 0
    slow = {**env, "STUB_SLEEP": "3"}  # `start` answers after 3 s
    with hung_in_start(tmp_path, slow, "staged", "apply", "demo") as proc:
        stager = subprocess.Popen(
            [LEGER, "staged", "stage", "demo", "--source", str(tmp_path / "v3")],
            env={**os.environ, "NO_COLOR": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Staged while the apply runs (with the fix: waiting for its lock).
        _out, err = proc.communicate(timeout=60)
        _out, stage_err = stager.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert stager.returncode == 0, stage_err
    quadlets = Path(env["LEGER_QUADLET_DIR"])
    assert "Image=localhost/x:2" in (quadlets / "web.container").read_text()
    waiting = Path(env["XDG_DATA_HOME"]) / "leger/staged/demo/web.container"
    assert waiting.exists(), "the update staged during the apply was discarded"
    assert "Image=localhost/x:3" in waiting.read_text()


def test_an_apply_killed_half_way_is_not_taken_for_the_recorded_version(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    """SIGKILL (nothing runs on it) after the files were swapped: the record still said v1
    while v2's files were installed, so the next failed apply "rolled back" to v2's files
    under v1's record (its backup listed as version 1, holding v2). Now the next apply is
    refused, naming the backup that puts v1 back; restoring it stops v2's services too."""
    env = stub_systemctl(tmp_path, leger_env)
    (tmp_path / "v2" / "extra.container").write_text("[Container]\nImage=localhost/x:2\n")
    assert leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v1")).returncode == 0
    with hung_in_start(
        tmp_path, env, "deploy", "install", "demo", "--source", str(tmp_path / "v2")
    ) as proc:
        proc.kill()
        proc.communicate(timeout=30)
    quadlets = Path(env["LEGER_QUADLET_DIR"])
    (tmp_path / "failing").touch()
    after = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v3"))
    (tmp_path / "failing").unlink()
    assert after.returncode == 1, (after.returncode, after.stderr)
    assert "was interrupted" in after.stderr and "leger backup restore bk_" in after.stderr
    backup = after.stderr.split("leger backup restore ", 1)[1].split("`")[0].strip()
    restored = leger(env, "backup", "restore", backup)
    assert restored.returncode == 0, restored.stderr
    assert "Image=localhost/x:1" in (quadlets / "web.container").read_text()
    assert "extra.service" in (tmp_path / "stops").read_text().splitlines()[-1]
    assert not (quadlets / "extra.container").exists()
    again = leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v3"))
    assert again.returncode == 0, again.stderr
    assert "Image=localhost/x:3" in (quadlets / "web.container").read_text()


def test_remove_after_a_killed_apply_leaves_no_quadlet_behind(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    """The killed apply installed a file the record does not list; `deploy remove` went by
    the record only and left that quadlet in the directory systemd reads."""
    env = stub_systemctl(tmp_path, leger_env)
    (tmp_path / "v2" / "extra.container").write_text("[Container]\nImage=localhost/x:2\n")
    assert leger(env, "deploy", "install", "demo", "--source", str(tmp_path / "v1")).returncode == 0
    with hung_in_start(
        tmp_path, env, "deploy", "install", "demo", "--source", str(tmp_path / "v2")
    ) as proc:
        proc.kill()
        proc.communicate(timeout=30)
    quadlets = Path(env["LEGER_QUADLET_DIR"])
    assert (quadlets / "extra.container").exists()
    removed = leger(env, "deploy", "remove", "demo")
    assert removed.returncode == 0, removed.stderr
    assert sorted(p.name for p in quadlets.iterdir()) == []
