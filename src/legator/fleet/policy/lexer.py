"""Splitting a shell line: command substitutions out, then simple commands (argv lists), the
redirections that write a file, and the constructs this reader does not follow.

Both steps scan with regular expressions that take a whole run of ordinary text at once, so
a line costs time in proportion to its length, not a Python step per character."""

from __future__ import annotations

import re

SAFE_TARGETS = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})


class Unparseable(ValueError):
    pass


# Each nested substitution is classified by a call of its own: past this depth a line is
# refused (remediate), not a RecursionError, and no real command comes near it.
MAX_NESTING = 32

# Outside quotes: ordinary text, a ``$ < >`` that opens no substitution, an escaped
# character, a single-quoted string, and a double-quoted string holding no substitution.
# Possessive quantifiers and an unambiguous double-quote body keep a failed match linear.
_DQ_BODY = r'[^"\\`$<>]*+(?:(?:[$<>](?!\()|\\[\s\S])[^"\\`$<>]*+)*+'
_RUN = re.compile(
    r"""(?:[^\\'"\n`$<>]++|[$<>](?!\()|\\[\s\S]|'[^']*+'|""" + '"' + _DQ_BODY + '")++'
)
# Inside a double-quoted string that holds a substitution: the text up to the next one.
_DQ_RUN = re.compile(r'(?:[^"\\`$<>]++|[$<>](?!\()|\\[\s\S])++')
_PAREN = re.compile(r"[()]")


def split_substitutions(line: str) -> tuple[str, list[str]]:
    """Replace ``$( )``, ``<( )``, ``>( )`` and backtick substitutions by a placeholder word,
    returning the outer line and the inner command lines; unquoted newlines become ``;``."""
    out: list[str] = []
    inner: list[str] = []
    i, n = 0, len(line)
    in_double = False
    while i < n:
        run = (_DQ_RUN if in_double else _RUN).match(line, i)
        if run is not None:
            out.append(run.group())
            i = run.end()
            continue
        ch = line[i]
        if ch == "\\":  # an escape the run did not take has nothing after it
            raise Unparseable("line ends with a backslash")
        if ch == "'":  # a closed single-quoted string is part of a run
            raise Unparseable("unterminated quote")
        if ch == '"':
            in_double = not in_double
            out.append(ch)
            i += 1
        elif ch == "\n":  # a run takes a newline inside quotes
            out.append(" ; ")
            i += 1
        elif ch == "`":
            end = line.find("`", i + 1)
            if end < 0:
                raise Unparseable("unterminated backtick")
            inner.append(line[i + 1 : end])
            out.append(" __subst__ ")
            i = end + 1
        else:  # ``$(``, ``<(`` or ``>(``
            if ch == "$" and line.startswith("(", i + 2):
                raise Unparseable("arithmetic expansion is not classified")
            end = _closing_paren(line, i + 2)
            inner.append(line[i + 2 : end])
            out.append(" __subst__ ")
            i = end + 1
    if in_double:
        raise Unparseable("unterminated quote")
    return "".join(out), inner


def _closing_paren(line: str, start: int) -> int:
    """The index of the ``)`` that closes a substitution whose body begins at ``start``."""
    depth = 1
    for paren in _PAREN.finditer(line, start):
        if paren.group() == "(":
            depth += 1
            if depth > MAX_NESTING:
                raise Unparseable(f"parentheses nested more than {MAX_NESTING} deep")
        else:
            depth -= 1
            if depth == 0:
                return paren.start()
    raise Unparseable("unterminated command substitution")


# The words of a substitution-free line as ``shlex.shlex(line, posix=True,
# punctuation_chars=";&|<>(){}")`` with ``whitespace_split`` and no commenters gives them
# (a test holds the two equal): a run of those punctuation characters is one token, and a
# word is unquoted text, escapes and quoted strings up to whitespace or punctuation.
_OPERATOR_RUN = r"[;&|<>(){}]++"
_WORD = (
    r"""(?:[^ \t\r\n;&|<>(){}'"\\]++|\\[\s\S]|'[^']*+'|"""
    r""""[^"\\]*+(?:\\[\s\S][^"\\]*+)*+")++"""
)
_TOKEN = re.compile(rf"[ \t\r\n]*+(?:({_OPERATOR_RUN})|({_WORD}))")
# The same without capturing groups (the re module refuses them in a possessive repeat).
_WHOLE_LINE = re.compile(rf"(?:[ \t\r\n]*+(?:{_OPERATOR_RUN}|{_WORD}))*+[ \t\r\n]*+")
_PIECE = re.compile(r"""\\([\s\S])|'([^']*)'|"((?:[^"\\]|\\[\s\S])*)"|([^\\'"]+)""")
_DQ_ESCAPE = re.compile(r'\\(["\\])')


def _unquote(word: str) -> str:
    first = word[0]
    if first in "'\"" and word.find(first, 1) == len(word) - 1:
        if first == "'" or "\\" not in word:
            return word[1:-1]  # one quoted string with no escape in it
    elif "\\" not in word and "'" not in word and '"' not in word:
        return word
    parts = []
    for escaped, single, double, plain in _PIECE.findall(word):
        if double:
            # Inside double quotes a backslash escapes only ``"`` and itself.
            parts.append(_DQ_ESCAPE.sub(r"\1", double))
        else:
            parts.append(escaped or single or plain)
    return "".join(parts)


def tokens(line: str) -> list[str]:
    """The words and operator runs of a substitution-free line, quotes removed."""
    if _WHOLE_LINE.fullmatch(line) is None:
        raise Unparseable("unterminated quote, or a backslash with nothing after it")
    pairs = _TOKEN.findall(line)
    if "\\" not in line and "'" not in line and '"' not in line:
        return [operator or word for operator, word in pairs]
    return [operator or _unquote(word) for operator, word in pairs]


_OPERATORS = frozenset({";", "&&", "||", "|", "&", "|&", ";;", "(", ")", "{", "}", "!"})
_SEPARATOR_CHARS = frozenset(";&|(){}")
_REDIRECT_CHARS = frozenset("<>&|")
_OPERATOR_FIRST = _SEPARATOR_CHARS | _REDIRECT_CHARS | {"!"}


def simple_commands(line: str) -> tuple[list[list[str]], list[str], bool]:
    """Split a substitution-free line into simple commands (argv lists), the redirect targets
    that write, and whether a heredoc or other construct we do not follow appeared."""
    words = tokens(line)
    commands: list[list[str]] = [[]]
    writes: list[str] = []
    opaque = False
    start = 0  # the first word not yet placed
    # Only a token that begins with an operator character can be more than a word.
    for index in [i for i, word in enumerate(words) if word[:1] in _OPERATOR_FIRST]:
        if index < start:
            continue  # the target of a redirection
        commands[-1].extend(words[start:index])
        token = words[index]
        start = index + 1
        if token in _OPERATORS or set(token) <= _SEPARATOR_CHARS:
            commands.append([])
        elif set(token) <= _REDIRECT_CHARS:
            if token.startswith("<<"):
                opaque = True
            target = words[index + 1] if index + 1 < len(words) else ""
            dup = token.endswith("&") and (target.isdigit() or target == "-")
            if ">" in token and not dup and target not in SAFE_TARGETS:
                writes.append(target or "?")
            elif target.startswith(("/dev/tcp/", "/dev/udp/")):
                writes.append(target)  # bash opens a connection, also to read from it
            start = index + 2  # past the target word
        else:
            commands[-1].append(token)
    commands[-1].extend(words[start:])
    return [c for c in commands if c], writes, opaque
