"""Options, read as getopt_long does: a program's option syntax, the parsed options and
words, and the verb (first word) when no option before it leaves it unsure."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from legator.fleet.policy.levels import DIAGNOSE, REMEDIATE


@dataclass(frozen=True)
class Syntax:
    """A program's options. ``short_flags`` None: any letter not listed takes no value."""

    short_values: str = ""
    short_optional: str = ""  # letters whose value, if any, is attached (``-i.bak``)
    short_flags: str | None = None
    long_values: frozenset[str] = frozenset()
    long_flags: frozenset[str] = frozenset()
    stop_at_word: bool = False  # options end at the first word ("+" in the optstring)


@dataclass(frozen=True)
class _Opt:
    name: str  # "-o", "--output" (the full name), or the text given when unknown
    value: str | None
    sure: bool  # known, and spelled in full


@dataclass
class _Parsed:
    items: list[_Opt | str]

    @property
    def words(self) -> list[str]:
        return [item for item in self.items if isinstance(item, str)]

    @property
    def options(self) -> list[_Opt]:
        return [item for item in self.items if isinstance(item, _Opt)]

    def has(self, *names: str) -> bool:
        return any(option.name in names for option in self.options)

    def values(self, *names: str) -> list[str | None]:
        return [option.value for option in self.options if option.name in names]

    def unsure_before_word(self, skip: int = 0) -> bool:
        """An unknown or abbreviated option before the ``skip``-th word (the verb): it may
        have taken the next word as its value, so the verb is not known for sure."""
        seen = 0
        for item in self.items:
            if isinstance(item, str):
                if seen == skip:
                    return False
                seen += 1
            elif not item.sure:
                return True
        return False


def _long_names(given: str, known: Iterable[str]) -> list[str]:
    """The long options ``--given`` selects: itself when known, else every known option it
    abbreviates (getopt_long accepts any unambiguous prefix; an ambiguous one is taken to
    mean all of its candidates, so a check errs on the strong side)."""
    names = set(known)
    if given in names:
        return [given]
    return sorted(name for name in names if name.startswith(given)) if given else []


def parse(args: Sequence[str], syntax: Syntax) -> _Parsed:
    items: list[_Opt | str] = []
    known_long = syntax.long_values | syntax.long_flags
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            items += args[i:]
            break
        if arg == "-" or not arg.startswith("-"):
            items.append(arg)
            if syntax.stop_at_word:
                items += args[i:]
                break
            continue
        if arg.startswith("--"):
            given, equals, value = arg[2:].partition("=")
            names = _long_names(given, known_long)
            if names == [given]:
                takes = given in syntax.long_values
                if takes and not equals and i < len(args):
                    value, equals = args[i], "="
                    i += 1
                items.append(_Opt("--" + given, value if equals else None, True))
            elif len(names) == 1:  # a unique abbreviation is that option, value and all
                if names[0] in syntax.long_values and not equals and i < len(args):
                    value, equals = args[i], "="
                    i += 1
                items.append(_Opt("--" + names[0], value if equals else None, False))
            elif names:
                items += [_Opt("--" + name, value if equals else None, False) for name in names]
            else:
                items.append(_Opt("--" + given, value if equals else None, False))
            continue
        for j in range(1, len(arg)):
            letter = arg[j]
            rest = arg[j + 1 :]
            if letter in syntax.short_values:
                if not rest and i < len(args):
                    rest = args[i]
                    i += 1
                items.append(_Opt("-" + letter, rest, True))
                break
            if letter in syntax.short_optional:
                items.append(_Opt("-" + letter, rest or None, True))
                break
            sure = syntax.short_flags is None or letter in syntax.short_flags
            items.append(_Opt("-" + letter, None, sure))
    return _Parsed(items)


def names(words: str) -> frozenset[str]:
    return frozenset(words.split())


def verb(parsed: _Parsed, index: int = 0) -> str | None:
    """The ``index``-th word (a verb), or None when an option before it leaves it unsure."""
    if parsed.unsure_before_word(index):
        return None
    words = parsed.words
    return words[index] if index < len(words) else ""


def unless_given(
    syntax: Syntax, writes: Iterable[str], level: str = DIAGNOSE
) -> Callable[[list[str]], str]:
    """A program that reads (at ``level``), unless given one of ``writes``, an abbreviation
    of one included: then it is ``remediate``."""
    given = tuple(writes)

    def check(args: list[str]) -> str:
        return REMEDIATE if parse(args, syntax).has(*given) else level

    return check
