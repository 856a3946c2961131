"""The dependency rules of DESIGN.md, checked on the source: core imports no wing, and the
probe's shared modules stay pure."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "legator"
WINGS = (
    "fleet",
    "probe",
    "brain",
    "ops",
    "gateway",
    "secrets",
    "deploy",
    "mcp",
    "web",
    "cli",
    "app",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_imports_no_wing() -> None:
    offenders = []
    for path in (SRC / "core").rglob("*.py"):
        for name in _imports(path):
            parts = name.split(".")
            is_wing = parts[0] == "legator" and len(parts) > 1 and parts[1] in WINGS
            # The core app factory mounts the sign-in pages, which hold no logic.
            sign_in_pages = path.name == "app.py" and name.startswith("legator.web.pages")
            if is_wing and not sign_in_pages:
                offenders.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offenders, offenders
