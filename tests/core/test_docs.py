"""Docs tell the truth: every setting is documented, and the README shows the two commands."""

from __future__ import annotations

from pathlib import Path

from legator.core.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        ENV_PREFIX + name.upper()
        for name in Settings.model_fields
        if f"`{ENV_PREFIX}{name.upper()}`" not in text
    ]
    assert not missing, f"undocumented settings: {missing}"


def test_readme_leads_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert text.index("make run") < text.index("## Configuration")
    assert "make test" in text
