"""Splitting a shell line: command substitutions out, then simple commands (argv lists), the
redirections that write a file, and the constructs this reader does not follow."""

from __future__ import annotations

import shlex

SAFE_TARGETS = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})


class Unparseable(ValueError):
    pass


# Each nested substitution is classified by a call of its own: past this depth a line is
# refused (remediate), not a RecursionError, and no real command comes near it.
MAX_NESTING = 32


def split_substitutions(line: str) -> tuple[str, list[str]]:
    """Replace ``$( )``, ``<( )``, ``>( )`` and backtick substitutions by a placeholder word,
    returning the outer line and the inner command lines; unquoted newlines become ``;``."""
    out: list[str] = []
    inner: list[str] = []
    i, n = 0, len(line)
    quote: str | None = None
    while i < n:
        ch = line[i]
        if quote == "'":
            out.append(ch)
            if ch == "'":
                quote = None
            i += 1
            continue
        if ch == "\\":
            if i + 1 >= n:
                raise Unparseable("line ends with a backslash")
            out.append(line[i : i + 2])
            i += 2
            continue
        if ch in "\"'" and quote is None:
            quote = ch
            out.append(ch)
            i += 1
            continue
        if ch == '"' and quote == '"':
            quote = None
            out.append(ch)
            i += 1
            continue
        if quote is None and ch == "\n":
            out.append(" ; ")
            i += 1
            continue
        if ch == "`":
            end = line.find("`", i + 1)
            if end < 0:
                raise Unparseable("unterminated backtick")
            inner.append(line[i + 1 : end])
            out.append(" __subst__ ")
            i = end + 1
            continue
        if ch in "$<>" and i + 1 < n and line[i + 1] == "(":
            if ch == "$" and i + 2 < n and line[i + 2] == "(":
                raise Unparseable("arithmetic expansion is not classified")
            depth, j = 1, i + 2
            while j < n and depth:
                if line[j] == "(":
                    depth += 1
                    if depth > MAX_NESTING:
                        raise Unparseable(f"parentheses nested more than {MAX_NESTING} deep")
                elif line[j] == ")":
                    depth -= 1
                j += 1
            if depth:
                raise Unparseable("unterminated command substitution")
            inner.append(line[i + 2 : j - 1])
            out.append(" __subst__ ")
            i = j
            continue
        out.append(ch)
        i += 1
    if quote is not None:
        raise Unparseable("unterminated quote")
    return "".join(out), inner


_OPERATORS = frozenset({";", "&&", "||", "|", "&", "|&", ";;", "(", ")", "{", "}", "!"})


def simple_commands(line: str) -> tuple[list[list[str]], list[str], bool]:
    """Split a substitution-free line into simple commands (argv lists), the redirect targets
    that write, and whether a heredoc or other construct we do not follow appeared."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>(){}")
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise Unparseable(str(exc)) from None
    commands: list[list[str]] = [[]]
    writes: list[str] = []
    opaque = False
    it = iter(range(len(tokens)))
    for index in it:
        token = tokens[index]
        if token in _OPERATORS or (token and set(token) <= set(";&|(){}")):
            commands.append([])
            continue
        if token and set(token) <= set("<>&|"):
            if token.startswith("<<"):
                opaque = True
            target = tokens[index + 1] if index + 1 < len(tokens) else ""
            dup = token.endswith("&") and (target.isdigit() or target == "-")
            if ">" in token and not dup and target not in SAFE_TARGETS:
                writes.append(target or "?")
            elif target.startswith(("/dev/tcp/", "/dev/udp/")):
                writes.append(target)  # bash opens a connection, also to read from it
            next(it, None)  # the target word
            continue
        commands[-1].append(token)
    return [c for c in commands if c], writes, opaque
