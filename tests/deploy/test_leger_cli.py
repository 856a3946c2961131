"""leger commands against a local directory or git source, real Podman, the systemd stand-in."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from legator.core.security import random_hex
from legator.deploy.client import Login, save_login
from legator.deploy.sources import parse_git
from tests.deploy.helpers import calls, leger, podman

RUN = "trap 'exit 0' TERM; sleep 3600 & wait"


def app_dir(directory: Path, image: str, suffix: str, *, secret: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[Unit]",
        "After=network-online.target",
        "[Container]",
        f"Image={image}",
        f"ContainerName=leger-t-{suffix}",
        "Volume=app-data.volume:/data",
        f'Exec=sh -c "[ -f /data/m ] || echo one > /data/m; echo app-started; {RUN}"',
    ]
    if secret:
        lines.append(f"Secret=leger-t-{suffix},type=env,target=TOKEN")
    (directory / "app.container").write_text("\n".join(lines) + "\n")
    (directory / "app-data.volume").write_text(f"[Volume]\nVolumeName=leger-t-{suffix}\n")
    return directory


@pytest.fixture
def suffix() -> str:
    return random_hex(4)


@pytest.fixture
def cleanup(suffix: str):  # type: ignore[no-untyped-def]
    yield
    podman("rm", "-f", "-t", "0", f"leger-t-{suffix}")
    podman("volume", "rm", "-f", f"leger-t-{suffix}")
    podman("secret", "rm", f"leger-t-{suffix}")


def test_missing_secret_stops_install_before_anything_changes(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str, cleanup: None
) -> None:
    source = app_dir(tmp_path / "src", image, suffix)
    result = leger(leger_env, "deploy", "install", "app", "--source", str(source))
    assert result.returncode == 1
    assert f"missing secret leger-t-{suffix}" in result.stderr
    assert not any(Path(leger_env["LEGER_QUADLET_DIR"]).glob("*"))
    assert calls(leger_env) == []
    assert podman("volume", "exists", f"leger-t-{suffix}").returncode != 0


def test_install_dry_run_no_start_list_service_and_remove(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str, cleanup: None
) -> None:
    env = {**leger_env, f"LEGER_SECRET_LEGER_T_{suffix.upper()}": "tok-1"}
    source = app_dir(tmp_path / "src", image, suffix)
    dry = leger(env, "deploy", "install", "app", "--source", str(source), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert not plan["applied"] and plan["plan"]["add"] == ["app-data.volume", "app.container"]
    assert not any(Path(env["LEGER_QUADLET_DIR"]).glob("*")) and calls(env) == []

    result = leger(env, "deploy", "install", "app", "--source", str(source), "--no-start")
    assert result.returncode == 0, result.stderr
    assert (Path(env["LEGER_QUADLET_DIR"]) / "app.container").exists()
    assert [c[2] for c in calls(env)] == ["daemon-reload"]
    listed = json.loads(leger(env, "deploy", "list", "--json").stdout)
    assert listed[0]["states"] == {"app.service": "inactive"}

    assert leger(env, "service", "start", "app").returncode == 0
    status = leger(env, "service", "status", "app")
    assert status.returncode == 0 and "Active: active" in status.stdout
    token = podman("exec", f"leger-t-{suffix}", "sh", "-c", "echo $TOKEN").stdout.decode()
    assert token.strip() == "tok-1"
    logs = leger(env, "service", "logs", "app", "-n", "5")
    assert logs.returncode == 0 and "app-started" in logs.stdout  # the service's own output
    assert ["journalctl", "--user", "--no-pager", "-n", "5", "-u", "app.service"] in calls(env)
    assert leger(env, "service", "stop", "app").returncode == 0
    assert leger(env, "service", "status", "app").returncode == 3

    # Another deployment may not take over app's files.
    clash = leger(env, "deploy", "install", "other", "--source", str(source), "--no-start")
    assert clash.returncode == 4 and "belongs to deployment 'app'" in clash.stderr

    removed = leger(env, "deploy", "remove", "app", "--backup-volumes")
    assert removed.returncode == 0, removed.stderr
    assert not (Path(env["LEGER_QUADLET_DIR"]) / "app.container").exists()
    assert podman("secret", "inspect", f"leger-t-{suffix}").returncode != 0
    assert podman("volume", "exists", f"leger-t-{suffix}").returncode != 0
    backups = json.loads(leger(env, "backup", "list", "--json").stdout)
    assert backups[0]["reason"] == "before remove"
    assert leger(env, "deploy", "remove", "app").returncode == 3


def test_backup_restore_recreates_the_volume(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str, cleanup: None
) -> None:
    source = app_dir(tmp_path / "src", image, suffix, secret=False)
    assert leger(leger_env, "deploy", "install", "app", "--source", str(source)).returncode == 0
    container = f"leger-t-{suffix}"
    assert podman("exec", container, "cat", "/data/m").stdout.decode().strip() == "one"
    created = leger(leger_env, "backup", "create", "app")
    assert created.returncode == 0, created.stderr
    backup_id = created.stdout.split()[1].rstrip(":")
    info = json.loads(leger(leger_env, "backup", "info", backup_id, "--json").stdout)
    assert info["volumes"] == [container] and info["files"] == ["app-data.volume", "app.container"]

    podman("exec", container, "sh", "-c", "echo two > /data/m")
    leger(leger_env, "service", "stop", "app")
    podman("volume", "rm", "-f", container)  # the volume is gone entirely
    restored = leger(leger_env, "backup", "restore", backup_id)
    assert restored.returncode == 0, restored.stderr
    assert podman("exec", container, "cat", "/data/m").stdout.decode().strip() == "one"
    assert leger(leger_env, "backup", "info", "bk_nope").returncode == 3


def test_staging_verifies_checksums_and_is_atomic(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str
) -> None:
    source = app_dir(tmp_path / "src", image, suffix, secret=False)
    assert leger(leger_env, "staged", "stage", "app", "--source", str(source)).returncode == 0
    staged = json.loads(leger(leger_env, "staged", "list", "--json").stdout)
    assert [s["name"] for s in staged] == ["app"]
    # A manifest whose checksum does not match: staging fails, the earlier stage is intact.
    manifest_dir = tmp_path / "signed"
    manifest_dir.mkdir()
    (manifest_dir / "app.container").write_text("[Container]\nImage=x\n")
    entry = {"path": "app.container", "sha256": "0" * 64, "size": 20}
    (manifest_dir / "manifest.json").write_text(
        json.dumps({"version": 7, "created_at": "2026-01-01T00:00:00Z", "files": [entry]})
    )
    bad = leger(leger_env, "staged", "stage", "app", "--source", str(manifest_dir))
    assert bad.returncode == 1 and "sha256" in bad.stderr
    staged_dir = Path(leger_env["XDG_DATA_HOME"]) / "leger/staged"
    assert sorted(p.name for p in staged_dir.iterdir()) == ["app"]
    assert (staged_dir / "app" / "app-data.volume").exists()
    diff = leger(leger_env, "staged", "diff", "app", "--json")
    assert json.loads(diff.stdout)["affected_services"] == ["app"]
    assert leger(leger_env, "staged", "discard", "app").returncode == 0
    assert leger(leger_env, "staged", "apply", "app").returncode == 3


def test_install_from_git_branch_and_subpath(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str, cleanup: None
) -> None:
    repo = tmp_path / "repo"
    app_dir(repo / "stacks" / "app", image, suffix, secret=False)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git[:3], "init", "-q", "-b", "release"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "stack"], check=True)
    url = f"file://{repo}#release:stacks/app"
    result = leger(leger_env, "deploy", "install", "app", "--source", url, "--no-start")
    assert result.returncode == 0, result.stderr
    listed = json.loads(leger(leger_env, "deploy", "list", "--json").stdout)
    assert listed[0]["source"] == url
    assert leger(leger_env, "deploy", "remove", "app", "--remove-volumes").returncode == 0


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://github.com/acme/stacks/tree/main/ai/webui",
            ("https://github.com/acme/stacks.git", "main", "ai/webui"),
        ),
        (
            "https://github.com/acme/stacks/tree/dev",
            ("https://github.com/acme/stacks.git", "dev", ""),
        ),
        (
            "https://gitlab.com/acme/infra/stacks/-/tree/prod/quadlets",
            ("https://gitlab.com/acme/infra/stacks.git", "prod", "quadlets"),
        ),
        ("https://git.example.com/x.git#v2:sub", ("https://git.example.com/x.git", "v2", "sub")),
        ("ssh://git@host/x.git", ("ssh://git@host/x.git", None, "")),
    ],
)
def test_git_url_forms(url: str, expected: tuple[str, str | None, str]) -> None:
    found = parse_git(url)
    assert found is not None and (found.url, found.branch, found.subpath) == expected
    assert parse_git("not a url") is None


def test_auth_status_honours_expiry(leger_env: dict[str, str]) -> None:
    assert leger(leger_env, "auth", "status").returncode == 1
    path = Path(leger_env["XDG_CONFIG_HOME"]) / "leger/auth.json"
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    save_login(path, Login("http://x", "lgk_" + "0" * 64, "api_key", "me", "k", past, past))
    status = json.loads(leger(leger_env, "auth", "status", "--json").stdout)
    assert status["expired"] is True and "token" not in status
    pulled = leger(leger_env, "config", "pull")
    assert pulled.returncode == 1 and "expired" in pulled.stderr
    assert leger(leger_env, "auth", "logout").returncode == 0
    assert not path.exists()


def test_validate_and_conflicts_cli(tmp_path: Path, leger_env: dict[str, str]) -> None:
    (tmp_path / "a.container").write_text(
        "[Container]\nImage=docker.io/a/b:1\nPublishPort=18300:1\n"
    )
    (tmp_path / "b.container").write_text(
        "[Container]\nImage=docker.io/a/b:1\nPublishPort=18300:2\n"
    )
    valid = leger(leger_env, "validate", str(tmp_path), "--json")
    assert valid.returncode == 0 and json.loads(valid.stdout)["generator"]
    clash = leger(leger_env, "check-conflicts", str(tmp_path), "--json")
    assert clash.returncode == 1
    assert [f["check"] for f in json.loads(clash.stdout)["findings"]] == ["port"]
    (tmp_path / "b.container").write_text("[Container]\nPublishPort=18301:2\n")
    invalid = leger(leger_env, "validate", str(tmp_path))
    assert invalid.returncode == 1 and "needs Image= or Rootfs=" in invalid.stdout
    status = leger(leger_env, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["deployments"] == {}


def test_force_and_no_secrets_flags(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str, cleanup: None
) -> None:
    source = app_dir(tmp_path / "src", image, suffix)
    quadlets = Path(leger_env["LEGER_QUADLET_DIR"])
    quadlets.mkdir(parents=True)
    (quadlets / "app.container").write_text("[Container]\nImage=hand/made:1\n")
    refused = leger(
        leger_env, "deploy", "install", "app", "--source", str(source), "--no-start", "--no-secrets"
    )
    assert refused.returncode == 4 and "not managed by leger" in refused.stderr
    forced = leger(
        leger_env,
        "deploy",
        "install",
        "app",
        "--source",
        str(source),
        "--no-start",
        "--no-secrets",
        "--force",
        "--json",
    )
    assert forced.returncode == 0, forced.stderr
    result = json.loads(forced.stdout)
    assert (
        result["plan"]["secrets"] == [] and "--force replaces it" in result["plan"]["warnings"][0]
    )
    assert (quadlets / "app.container").read_text() == (source / "app.container").read_text()
    assert podman("secret", "inspect", f"leger-t-{suffix}").returncode != 0  # --no-secrets
    assert leger(leger_env, "deploy", "remove", "app").returncode == 0


def test_failed_first_install_leaves_nothing_behind(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str, cleanup: None
) -> None:
    env = {**leger_env, f"LEGER_SECRET_LEGER_T_{suffix.upper()}": "tok"}
    source = app_dir(tmp_path / "src", "localhost/leger-no-such-image:1", suffix)
    result = leger(
        env, "deploy", "install", "app", "--source", str(source), "--health-timeout", "3"
    )
    assert result.returncode == 5, result.stderr
    assert "rolled back" in result.stderr and "leger-no-such-image" in result.stderr
    assert not any(Path(env["LEGER_QUADLET_DIR"]).glob("*"))
    assert json.loads(leger(env, "deploy", "list", "--json").stdout) == []
    assert podman("volume", "exists", f"leger-t-{suffix}").returncode != 0
    assert podman("secret", "inspect", f"leger-t-{suffix}").returncode != 0


def test_a_rolled_back_update_gives_the_service_its_previous_secret(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str, cleanup: None
) -> None:
    variable = f"LEGER_SECRET_LEGER_T_{suffix.upper()}"
    source = app_dir(tmp_path / "src", image, suffix)
    first = {**leger_env, variable: "tok-1"}
    installed = leger(first, "deploy", "install", "app", "--source", str(source))
    assert installed.returncode == 0, installed.stderr
    container = f"leger-t-{suffix}"
    assert podman("exec", container, "sh", "-c", "echo $TOKEN").stdout.decode().strip() == "tok-1"

    # A new secret value and a unit that dies at once: the update fails and rolls back.
    unit = source / "app.container"
    good = unit.read_text()
    unit.write_text(good.replace('Exec=sh -c "', 'Exec=sh -c "exit 1; '))
    env = {**leger_env, variable: "tok-2"}
    result = leger(env, "deploy", "update", "app", "--health-timeout", "3")
    assert result.returncode == 5, result.stderr
    # The previous service runs again, with the secret's previous value.
    assert podman("exec", container, "sh", "-c", "echo $TOKEN").stdout.decode().strip() == "tok-1"
    message = " ".join(result.stderr.split())
    assert f"secrets {container} have their previous value again" in message
    assert "tok-1" not in result.stderr + result.stdout
    assert leger(env, "deploy", "remove", "app", "--remove-volumes").returncode == 0


def test_update_refetches_the_source(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str, cleanup: None
) -> None:
    source = app_dir(tmp_path / "src", image, suffix, secret=False)
    assert leger(leger_env, "deploy", "install", "app", "--source", str(source)).returncode == 0
    unit = source / "app.container"
    unit.write_text(unit.read_text() + "Environment=COLOUR=blue\n")
    dry = json.loads(leger(leger_env, "deploy", "update", "app", "--dry-run", "--json").stdout)
    assert dry["plan"]["change"] == ["app.container"] and dry["plan"]["stop"] == ["app.service"]
    result = leger(leger_env, "deploy", "update", "app", "--health-timeout", "5")
    assert result.returncode == 0, result.stderr
    colour = podman("exec", f"leger-t-{suffix}", "sh", "-c", "echo $COLOUR").stdout.decode()
    assert colour.strip() == "blue"
    assert podman("exec", f"leger-t-{suffix}", "cat", "/data/m").stdout.decode().strip() == "one"
    assert leger(leger_env, "deploy", "update", "nope").returncode == 3
    assert leger(leger_env, "deploy", "remove", "app", "--remove-volumes").returncode == 0


def test_system_scope_uses_system_systemctl(
    tmp_path: Path, image: str, leger_env: dict[str, str], suffix: str, cleanup: None
) -> None:
    env = {**leger_env, "LEGER_STATE_DIR": str(tmp_path / "var-lib-leger")}
    source = app_dir(tmp_path / "src", image, suffix, secret=False)
    result = leger(
        env, "deploy", "install", "app", "--source", str(source), "--system", "--no-start"
    )
    assert result.returncode == 0, result.stderr
    assert calls(env) == [["systemctl", "daemon-reload"]]
    assert (tmp_path / "var-lib-leger" / "deployments.json").exists()
    assert leger(env, "service", "status", "app", "--system").returncode == 3
    assert calls(env)[-1] == ["systemctl", "status", "--no-pager", "app.service"]
    assert leger(env, "deploy", "remove", "app", "--system", "--remove-volumes").returncode == 0


def test_a_quadlet_syntax_error_is_a_validation_failure(
    tmp_path: Path, leger_env: dict[str, str]
) -> None:
    """Exit 1 (failed or invalid) from install and validate alike, never 2 (usage)."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "web.container").write_text("[Container]\nImage=localhost/x:1\nnot a key\n")
    installed = leger(leger_env, "deploy", "install", "web", "--source", str(source), "--dry-run")
    assert installed.returncode == 1, installed.stderr
    assert "web.container:3: expected KEY=VALUE" in installed.stderr
    validated = leger(leger_env, "validate", str(source))
    assert validated.returncode == 1 and "expected KEY=VALUE" in validated.stdout
    (source / "web.container").write_bytes(b"[Container]\nImage=\xff\n")
    binary = leger(leger_env, "deploy", "install", "web", "--source", str(source), "--dry-run")
    assert binary.returncode == 1 and "web.container:0: not UTF-8 text" in binary.stderr
    assert leger(leger_env, "validate", str(source)).returncode == 1
    assert leger(leger_env, "deploy", "install", "Bad Name").returncode == 2  # usage
