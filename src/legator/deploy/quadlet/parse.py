"""Parse quadlet unit files.

Hand-written rather than ``configparser`` because systemd unit syntax repeats keys
(``PublishPort=`` twice is two ports), continues lines with a trailing backslash and treats
``;``/``#`` lines as comments; ``configparser`` would merge or reject all three. As in the
quadlet generator, a comment line is never continued (a trailing backslash in it is text),
and comment and blank lines inside a continuation are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

QUADLET_TYPES = (".container", ".volume", ".network", ".pod", ".kube", ".image", ".build")
_SECTION = re.compile(r"^\[([A-Za-z0-9_-]+)\]\Z")
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*\Z")


class ParseError(ValueError):
    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.message = path, line, message


@dataclass
class Unit:
    """One quadlet file: ``name`` is the file name, ``sections`` keep every key in order."""

    name: str
    text: str
    sections: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def type_section(self) -> str:
        return self.suffix[1:].capitalize()

    @property
    def service_name(self) -> str:
        """The systemd service the generator makes of this file."""
        if self.suffix == ".container" or self.suffix == ".kube":
            return self.get(self.type_section, "ServiceName") or f"{self.stem}.service"
        if self.suffix == ".pod":
            return f"{self.stem}-pod.service"
        return f"{self.stem}-{self.suffix[1:]}.service"

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v, _ in self.sections.get(section, []) if k == key]

    def get(self, section: str, key: str) -> str | None:
        found = self.values(section, key)
        return found[-1] if found else None


def parse_unit(name: str, text: str) -> Unit:
    unit = Unit(name=name, text=text)
    current: str | None = None
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        number = index + 1
        line = lines[index].strip()
        index += 1
        if not line or line[0] in "#;":
            continue  # a comment never continues, even when it ends in a backslash
        while line.endswith("\\") and index < len(lines):
            following = lines[index].strip()
            index += 1
            if not following or following[0] in "#;":
                continue  # as the quadlet generator does: skipped inside a continuation
            line = line[:-1] + " " + following
        if match := _SECTION.match(line):
            current = match.group(1)
            unit.sections.setdefault(current, [])
            continue
        if line.startswith("["):
            raise ParseError(name, number, f"malformed section header {line!r}")
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise ParseError(name, number, f"expected KEY=VALUE, got {line!r}")
        if current is None:
            raise ParseError(name, number, f"{key}= appears before any [Section]")
        unit.sections[current].append((key, value.strip(), number))
    return unit


def load_dir(directory: Path) -> tuple[list[Unit], list[ParseError]]:
    """Every quadlet file directly in ``directory`` (sorted), and the files that did not parse."""
    units: list[Unit] = []
    errors: list[ParseError] = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in QUADLET_TYPES:
            try:
                units.append(parse_unit(path.name, path.read_text(encoding="utf-8")))
            except ParseError as exc:
                errors.append(exc)
            except UnicodeDecodeError:
                errors.append(ParseError(path.name, 0, "not UTF-8 text"))
    return units, errors
