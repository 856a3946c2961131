"""Deploy: render + validate + stage + apply of a 20-service stack, in process.

The service manager is at the edge: `systemctl` is the recording stand-in from
tests/deploy/fakesystemd.py in record mode (no containers start), so the figure is leger's own
work plus the real quadlet generator (dry run and daemon-reload) and real Podman secrets.
Run: .venv/bin/python -m bench deploy
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.deploy import fakesystemd

from bench.common import report
from legator.deploy import staging
from legator.deploy.catalog.registry import CATALOG
from legator.deploy.installer import Deployer, Options
from legator.deploy.layout import layout
from legator.deploy.podman import Podman
from legator.deploy.quadlet.generator import find_generator
from legator.deploy.render import render
from legator.deploy.secrets_source import DirSecretSource
from legator.deploy.sources import Fetched
from legator.deploy.spec import validate_spec

ROUNDS = 5
TARGET_MS = 2000.0


def stack(extra_option: int = 0) -> dict[str, object]:
    """The 8 catalogue services (Open WebUI with its PostgreSQL) + 12 llama.cpp backends."""
    services: dict[str, object] = {name: {} for name in CATALOG}
    services["openwebui"] = {"database": "postgres"}
    for i in range(12):
        services[f"llamacpp@m{i}"] = {"port": 19100 + i, "context": 4096 + extra_option}
    return {"services": services}


def one_round(work: Path, secrets_dir: Path) -> dict[str, float]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    spec = validate_spec(stack())
    rendered = render(spec, version=1, created_at=datetime.now(UTC))
    timings["render"] = time.perf_counter() - start

    where = layout(False)
    start = time.perf_counter()
    fetched = Fetched(rendered.manifest, rendered.files, "bench")
    staged = staging.stage(where.staged, "bench", fetched)
    timings["stage"] = time.perf_counter() - start

    marks: list[tuple[str, float]] = []
    start = time.perf_counter()
    deployer = Deployer(
        where,
        DirSecretSource(secrets_dir),
        progress=lambda step: marks.append((step, time.perf_counter())),
    )
    result = deployer.apply(
        "bench", staged.manifest, staged.files(), "bench", staged.directory, Options()
    )
    assert result.applied and len(result.plan.start) == 20, result.plan
    end = time.perf_counter()
    timings["apply"] = end - start
    # The steps apply reports, timed from one step to the next.
    bounds = [*marks, ("end", end)]
    for (step, at), (_, following) in itertools.pairwise(bounds):
        timings[f"apply: {step}"] = following - at
    return timings


def main() -> None:
    generator = find_generator()
    assert generator, "run scripts/install-quadlet.sh first"
    podman = Podman()
    runs: list[dict[str, float]] = []
    secret_names: set[str] = set()
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory(prefix="leger-bench-") as tmp:
            work = Path(tmp)
            secrets_dir = work / "secrets"
            secrets_dir.mkdir()
            spec = validate_spec(stack())
            for name in render(
                spec, version=1, created_at=datetime.now(UTC)
            ).manifest.secrets_required:
                (secrets_dir / name).write_text("bench-" + name)
                secret_names.add(name)
            fakesystemd.install(work / "bin")
            os.environ.update(
                {
                    "PATH": f"{work / 'bin'}:{os.environ['PATH']}",
                    "LEGER_STATE_DIR": str(work / "state"),
                    "LEGER_QUADLET_DIR": str(work / "quadlets"),
                    "FAKE_SYSTEMD_DIR": str(work / "systemd"),
                    "FAKE_SYSTEMD_GENERATOR": generator,
                    "FAKE_SYSTEMD_MODE": "record",
                }
            )
            try:
                runs.append(one_round(work, secrets_dir))
            finally:
                os.environ["PATH"] = os.environ["PATH"].split(":", 1)[1]
                for name in secret_names:
                    podman.secret_remove(name)
    rows = []
    for phase in runs[0]:
        values = [run[phase] * 1000 for run in runs]
        rows.append({"case": phase, "median_ms": statistics.median(values), "max_ms": max(values)})
    totals = [(run["render"] + run["stage"] + run["apply"]) * 1000 for run in runs]
    rows.append(
        {
            "case": "total (20 services)",
            "median_ms": statistics.median(totals),
            "max_ms": max(totals),
        }
    )
    report(
        "deploy",
        f"Deploy: render + validate + stage + apply of 20 services ({ROUNDS} rounds; target "
        f"< {TARGET_MS:.0f} ms)",
        rows,
        rounds=ROUNDS,
        services=20,
        generator=generator,
        target_ms=TARGET_MS,
        met=statistics.median(totals) < TARGET_MS,
    )
