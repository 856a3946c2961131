"""An allow or block list compiled once per policy: which entry, first in the list's order,
names a part of a line (a prefix of whole words) or a command it runs (a program and some of
its arguments, in order). Each lookup costs what the entries' length allows, not their
number times the command's length."""

from __future__ import annotations

import os
from collections.abc import Sequence


class Prefixes:
    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = tuple(entries)
        # An entry, spaces stripped, names a part that it starts up to a word's end.
        self._words: dict[str, int] = {}
        self._programs: dict[str, list[tuple[int, list[str]]]] = {}
        for index, entry in enumerate(self.entries):
            self._words.setdefault(entry.strip(), index)
            words = entry.split()
            if words:
                program = os.path.basename(words[0])
                self._programs.setdefault(program, []).append((index, words[1:]))
        self._longest_word_entry = max(map(len, self._words), default=-1)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def naming_part(self, part: str) -> int | None:
        """The index of the first entry that names ``part``, a simple command as text."""
        found: list[int] = []
        end = part.find(" ")
        end = len(part) if end < 0 else end
        while 0 <= end <= self._longest_word_entry:
            index = self._words.get(part[:end])
            if index is not None:
                found.append(index)
            if end == len(part):
                break
            end = part.find(" ", end + 1)
            end = len(part) if end < 0 else end
        return min(found, default=None)

    def naming_command(self, argv: Sequence[str]) -> int | None:
        """The index of the first entry that names this command (``[basename, *args]``):
        the same program, and the entry's other words among its arguments, in order."""
        if not argv:
            return None
        args = list(argv)
        for index, words in self._programs.get(args[0], ()):
            if _in_order(words, args):
                return index
        return None


def _in_order(words: list[str], argv: list[str]) -> bool:
    position = 1
    try:
        for word in words:
            position = argv.index(word, position) + 1
    except ValueError:
        return False
    return True
