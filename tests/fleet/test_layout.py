"""The probe is lean: it imports only the shared pure modules and its own, and those shared
modules import nothing of the server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "legator"
PROBE_MAY_IMPORT = (
    "legator.fleet.protocol",
    "legator.fleet.policy",
    "legator.core.canonical",
    "legator.core.audit.sanitiser",  # stdlib only, shipped in the zipapp (installer.py)
    "legator.probe",
    "legator",
)
SERVER_LIBRARIES = ("fastapi", "starlette", "sqlalchemy", "uvicorn", "alembic", "legator.core.db")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_probe_imports_only_shared_modules() -> None:
    files = [*(SRC / "probe").glob("*.py"), SRC / "cli" / "probe.py"]
    offenders = [
        f"{path.name} imports {name}"
        for path in files
        for name in _imports(path)
        if (
            name.startswith("legator")
            and name not in PROBE_MAY_IMPORT
            and not name.startswith("legator.probe.")
        )
        or name.split(".")[0] in ("fastapi", "starlette", "sqlalchemy", "uvicorn", "alembic")
    ]
    assert not offenders, offenders


def test_shared_modules_are_pure() -> None:
    policy = sorted((SRC / "fleet" / "policy").glob("*.py"))
    assert policy, "fleet/policy/ holds no module"
    sanitiser = SRC / "core" / "audit" / "sanitiser.py"  # in the probe's zipapp too
    for path in [SRC / "fleet" / "protocol.py", sanitiser, *policy]:
        for module in _imports(path):
            top = module.split(".")[0]
            assert (
                top in sys.stdlib_module_names
                or top == "pydantic"
                or module in ("legator.core.canonical",)
                or (path.parent.name == "policy" and module.startswith("legator.fleet.policy"))
            ), f"{path.relative_to(SRC)} imports {module}"


def test_importing_the_probe_loads_no_server_code() -> None:
    code = (
        "import sys, legator.cli.probe, legator.probe.agent;"
        f"bad = [m for m in sys.modules if m.startswith({SERVER_LIBRARIES!r})];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
