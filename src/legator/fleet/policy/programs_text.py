"""Rules for text tools that can also run code or write files: find, sed, awk, tee, sort,
uniq, xxd, yq and less."""

from __future__ import annotations

from collections.abc import Callable

from legator.fleet.policy.levels import DIAGNOSE, OBSERVE, REMEDIATE
from legator.fleet.policy.lexer import SAFE_TARGETS, Unparseable
from legator.fleet.policy.options import Syntax, names, parse


def _find(args: list[str]) -> str:
    writes = {
        "-exec",
        "-execdir",
        "-ok",
        "-okdir",
        "-delete",
        "-fprint",
        "-fprint0",
        "-fprintf",
        "-fls",
    }
    return REMEDIATE if any(a in writes for a in args) else DIAGNOSE


_SED = Syntax(
    short_values="efl",
    short_optional="i",
    long_values=names("expression file line-length"),
    long_flags=names(
        "in-place quiet silent debug follow-symlinks posix regexp-extended separate sandbox "
        "unbuffered null-data zero-terminated help version"
    ),
)
_SED_SIMPLE = frozenset("=dDgGhHnNpPxzF")


def _sed_script_is_safe(script: str) -> bool:
    """Whether a sed script neither runs (``e``, ``s///e``) nor writes (``w``, ``W``,
    ``s///w``) anything; a script this reader does not follow counts as unsafe."""
    i, n = 0, len(script)

    def skip_regex(start: int, delim: str) -> int:
        j = start
        while j < n and script[j] != delim:
            if script[j] == "\\":
                j += 1
            elif script[j] == "\n":
                raise Unparseable("newline in a regex")
            j += 1
        if j >= n:
            raise Unparseable("unterminated regex")
        return j + 1

    def skip_address(j: int) -> int:
        if j < n and script[j] == "/":
            return skip_regex(j + 1, "/")
        if j + 1 < n and script[j] == "\\":
            return skip_regex(j + 2, script[j + 1])
        while j < n and (script[j].isdigit() or script[j] in "$~+"):
            j += 1
        return j

    def to_line_end(j: int) -> int:
        end = script.find("\n", j)
        return n if end < 0 else end

    try:
        while i < n:
            while i < n and script[i] in " \t\n;{}!":
                i += 1
            if i >= n:
                break
            i = skip_address(i)
            if i < n and script[i] == ",":
                i = skip_address(i + 1)
            while i < n and script[i] in " \t!":
                i += 1
            if i >= n:
                break
            cmd = script[i]
            i += 1
            if cmd in "{}":
                continue
            if cmd in "ewW":
                return False
            if cmd in _SED_SIMPLE:
                continue
            if cmd in "#:aicrRbtTv":  # text, label, comment or file read to the line's end
                end = to_line_end(i)
                if cmd in "btT:v":  # labels also end at ";"
                    semi = script.find(";", i, end)
                    end = end if semi < 0 else semi
                i = end
                continue
            if cmd in "lLqQ":
                while i < n and (script[i].isdigit() or script[i] in " \t"):
                    i += 1
                continue
            if cmd in "sy":
                if i >= n or script[i] in "\\\n":
                    return False
                delim = script[i]
                i = skip_regex(skip_regex(i + 1, delim), delim)
                if cmd == "s":
                    while i < n and (script[i].isalnum()):
                        if script[i] in "ewW":
                            return False  # s///e runs the pattern space, s///w writes
                        i += 1
                continue
            return False
    except Unparseable:
        return False
    return True


def _sed(args: list[str]) -> str:
    parsed = parse(args, _SED)
    if parsed.has("-i", "--in-place") or not all(o.sure for o in parsed.options):
        return REMEDIATE
    if parsed.has("-f", "--file"):
        return REMEDIATE  # a script we cannot read
    scripts = [v or "" for v in parsed.values("-e", "--expression")]
    if not scripts:
        scripts = parsed.words[:1]
    if not parsed.has("--sandbox") and not all(_sed_script_is_safe(s) for s in scripts):
        return REMEDIATE
    return DIAGNOSE


_AWK = Syntax(
    short_values="Fvef",
    long_values=names("field-separator assign source file"),
    long_flags=names("sandbox posix traditional characters-as-bytes bignum"),
    stop_at_word=True,
)
_AWK_SAFE_OPTIONS = frozenset(
    {"-F", "-v", "-e", "--field-separator", "--assign", "--source", "--sandbox", "-S",
     "--posix", "-P", "--traditional", "-c", "--characters-as-bytes", "-b", "--bignum", "-M"}
)  # fmt: skip
# Indirect calls (@f()), @include/@load, system(), pipes, redirections, getline.
_AWK_MARKERS = ("system", ">", "|", "getline", "@")


def _awk(args: list[str]) -> str:
    parsed = parse(args, _AWK)
    if any(not o.sure or o.name not in _AWK_SAFE_OPTIONS for o in parsed.options):
        return REMEDIATE  # -f/-E program files, -l/--load, -i, --dump-variables, --profile…
    programs = [v or "" for v in parsed.values("-e", "--source")]
    if not programs:
        programs = parsed.words[:1]
    if any(marker in program for program in programs for marker in _AWK_MARKERS):
        return REMEDIATE
    return DIAGNOSE


def _tee(args: list[str]) -> str:
    files = [a for a in args if not a.startswith("-")]
    return OBSERVE if all(f in SAFE_TARGETS for f in files) else REMEDIATE


def _xxd(args: list[str]) -> str:
    """``xxd -r`` turns a dump back into bytes and writes them; a second file name is an
    output file. xxd matches options by their first letters, with one or two dashes."""
    files: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "-" or not arg.startswith("-"):
            files.append(arg)
            continue
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if name.startswith("r"):
            return REMEDIATE
        takes_value = name in ("c", "g", "l", "s", "o", "n", "R", "cols", "groupsize", "len")
        if (takes_value or name in ("seek", "offset", "name")) and rest:
            rest.pop(0)
    return REMEDIATE if len(files) > 1 and files[1] not in ("-", *SAFE_TARGETS) else OBSERVE


_SORT = Syntax(
    short_values="koSTt",
    long_values=names(
        "output compress-program key buffer-size field-separator temporary-directory "
        "batch-size files0-from random-source sort parallel"
    ),
    long_flags=names(
        "check ignore-leading-blanks dictionary-order ignore-case general-numeric-sort "
        "ignore-nonprinting month-sort human-numeric-sort numeric-sort random-sort reverse "
        "version-sort debug merge stable unique zero-terminated help version"
    ),
)


def _sort(args: list[str]) -> str:
    writes = parse(args, _SORT).has("-o", "--output", "--compress-program")
    return REMEDIATE if writes else OBSERVE


_YQ = Syntax(
    long_values=names("split-exp output-format input-format expression"),
    long_flags=names("inplace in-place"),
)


def _yq(args: list[str]) -> str:
    writes = parse(args, _YQ).has("-i", "-s", "--inplace", "--in-place", "--split-exp")
    return REMEDIATE if writes else OBSERVE


_LESS = Syntax(
    short_values="bhjkoOpPtTxyz",
    long_values=names("log-file LOG-FILE lesskey-file lesskey-src lesskey-content"),
)
_LESS_WRITES = frozenset(
    {"-o", "-O", "-k", "--log-file", "--LOG-FILE", "--lesskey-file", "--lesskey-src",
     "--lesskey-content"}
)  # fmt: skip


def _less(args: list[str]) -> str:
    parsed = parse(args, _LESS)
    # +cmd runs a less command at start; only searching and moving are let through.
    starts = [w[1:] for w in parsed.words if w.startswith("+")]
    if parsed.has(*_LESS_WRITES) or any(
        not (s[:1] in ("", "/", "G", "g", "F") or s.isdigit()) for s in starts
    ):
        return REMEDIATE
    return OBSERVE


def _uniq(args: list[str]) -> str:
    # ``uniq INPUT OUTPUT`` writes OUTPUT.
    return REMEDIATE if len([a for a in args if not a.startswith("-")]) > 1 else OBSERVE


RULES: dict[str, Callable[[list[str]], str]] = {
    "find": _find,
    "sed": _sed,
    "awk": _awk,
    "gawk": _awk,
    "mawk": _awk,
    "nawk": _awk,
    "tee": _tee,
    "sort": _sort,
    "uniq": _uniq,
    "xxd": _xxd,
    "yq": _yq,
    "less": _less,
}
