"""`legerd serve --max-* / --rate-*`: the quota and rate settings as flags, listed in --help,
overriding their LEGERD_* variables; a real legerd process."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from legator.secrets.quota import Quota
from legator.secrets.ratelimit import RateLimit
from tests.secrets.conftest import SETEC_HEADERS
from tests.support import BIN, free_port, one_line_error, run_cli

FLAGS = (
    "--max-versions-per-secret",
    "--max-secrets-per-writer",
    "--max-bytes-per-writer",
    "--max-total-bytes",
    "--rate-limit",
    "--rate-burst",
)


def test_serve_help_lists_every_limit_flag_with_its_variable() -> None:
    result = run_cli("legerd", "serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # rich wraps the help
    for flag in FLAGS:
        assert flag in text
    for variable in ("LEGERD_MAX_TOTAL_BYTES", "LEGERD_RATE_LIMIT", "LEGERD_RATE_BURST"):
        assert f"${variable}" in text


@contextmanager
def legerd(tmp_path: Path, shared_dir: Path, env: dict[str, str], *flags: str) -> Iterator[str]:
    """`legerd serve --dev` as a process; yields its URL."""
    port, sock = free_port(), shared_dir / "legerd.sock"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LEGERD_MAX", "LEGERD_RATE"))}
    where = ["--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [str(BIN / "legerd"), "serve", "--dev", *where, "--socket", str(sock), *flags],
        env={**base, "LEGERD_KEK": "", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "legerd did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def put(client: httpx.Client, name: str, value: bytes) -> httpx.Response:
    body = {"Name": name, "Value": base64.b64encode(value).decode()}
    return client.post("/api/put", json=body)


def test_a_limit_flag_overrides_its_variable(tmp_path: Path, shared_dir: Path) -> None:
    env = {"LEGERD_MAX_VERSIONS_PER_SECRET": "50", "LEGERD_RATE_LIMIT": "0"}
    flags = ("--max-versions-per-secret", "2", "--rate-limit", "0.01", "--rate-burst", "4")
    with (
        legerd(tmp_path, shared_dir, env, *flags) as url,
        httpx.Client(base_url=url, headers=SETEC_HEADERS) as client,
    ):
        assert [put(client, "a", bytes([n])).status_code for n in range(3)] == [200, 200, 400]
        # Three calls taken of the burst of 4: the fourth passes, the fifth waits.
        assert client.post("/api/list", content=b"{}").status_code == 200
        throttled = client.post("/api/list", content=b"{}")
    assert throttled.status_code == 429, throttled.text
    assert "at most 0.01 calls a second from one caller after a burst of 4" in throttled.text


def test_without_flags_the_variables_still_decide(tmp_path: Path, shared_dir: Path) -> None:
    env = {"LEGERD_MAX_VERSIONS_PER_SECRET": "1"}
    with (
        legerd(tmp_path, shared_dir, env) as url,
        httpx.Client(base_url=url, headers=SETEC_HEADERS) as client,
    ):
        assert [put(client, "a", bytes([n])).status_code for n in range(2)] == [200, 400]


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--max-total-bytes", "-1", "--max-total-bytes"),
        ("--rate-burst", "0", "--rate-burst"),
        ("--rate-limit", "nan", "--rate-limit"),
        ("--rate-limit", "inf", "--rate-limit='inf': expected a non-negative number"),
    ],
)
def test_a_bad_limit_flag_is_refused_naming_the_flag(
    tmp_path: Path, flag: str, value: str, says: str
) -> None:
    result = run_cli("legerd", "serve", "--dev", "--state-dir", str(tmp_path), flag, value)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert says in " ".join(result.stderr.split())
    assert not (tmp_path / "secrets.db").exists()


def test_the_flags_cover_every_quota_and_rate_setting() -> None:
    """A setting added later without a flag fails here."""
    settings = {f"--{name.replace('_', '-')}" for name in Quota.__dataclass_fields__}
    settings |= {"--rate-limit", "--rate-burst"}
    assert settings == set(FLAGS)
    assert set(RateLimit.__dataclass_fields__) == {"per_second", "burst", "max_sources"}


def test_a_bad_variable_is_still_named_when_a_flag_is_given(tmp_path: Path) -> None:
    result = run_cli(
        "legerd", "serve", "--dev", "--state-dir", str(tmp_path), "--max-total-bytes", "5",
        env={"LEGERD_RATE_BURST": "many"},
    )  # fmt: skip
    assert "LEGERD_RATE_BURST='many'" in one_line_error(result, 2)
