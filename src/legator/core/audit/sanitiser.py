"""Redacts secrets from anything bound for the audit log or the process log.

Two layers: values under a key that names a secret are replaced whole, and every string is
scanned for secret-shaped substrings (bearer tokens, Legator keys, JWTs, AWS keys, passwords
in key=value pairs and URLs, PEM private keys).
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any

REDACTED = "[REDACTED]"

_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "apikey",
        "authorization",
        "credential",
        "credentials",
        "cookie",
        "privatekey",
        "signingkey",
        "accesskey",
        "sessionid",
    }
)
_SECRET_PAIRS = frozenset(
    {
        ("api", "key"),
        ("private", "key"),
        ("signing", "key"),
        ("access", "key"),
        ("secret", "key"),
        ("session", "id"),
        ("client", "secret"),
        ("auth", "header"),
    }
)
_RUN_TOGETHER = ("password", "passwd", "passphrase")
_SPLIT_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SPLIT_WORDS = re.compile(r"[^a-z0-9]+")


_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(
            r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|$)", re.DOTALL
        ),
        REDACTED,
    ),
    # The Authorization header's value, whatever its scheme (Token, Bot, ApiKey…), or none;
    # first, so that Bearer and Basic below leave it as it is.
    (
        re.compile(
            r"(?i)\b((?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)"
            r"(?!(?:[a-z][\w-]*\s+)?\[REDACTED\])"
            r"((?:bearer|basic|token|bot|apikey|api-key|key|digest|negotiate|hmac)\s+)?"
            r"[^\s,;\"']+"
        ),
        r"\1\2" + REDACTED,
    ),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + REDACTED),
    (re.compile(r"\blgk_[0-9a-fA-F]{8,}"), "lgk_" + REDACTED),
    (re.compile(r"\bprb_[A-Za-z0-9_-]{8,}"), "prb_" + REDACTED),
    (re.compile(r"\blpk_[0-9a-fA-F]{8,}"), "lpk_" + REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    (
        re.compile(r"(?i)(aws_secret_access_key\s*[=:]\s*)[A-Za-z0-9/+=]{40}"),
        r"\1" + REDACTED,
    ),
    (re.compile(r"\b(sk-(?:ant-)?[A-Za-z0-9_-]{16,})"), REDACTED),
    (re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{20,})"), REDACTED),
    (re.compile(r"\b(hf_[A-Za-z0-9]{20,})"), REDACTED),
    # A URL's password, which may hold '/' (base64): up to the last '@' before the host.
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^@\s]+@"), r"\1" + REDACTED + "@"),
    (
        re.compile(
            r"(?i)\b([\w.-]*(?:pass(?:word|wd)?|secret|token|api[_-]?key|apikey|credential)"
            # The name may end a quoted key of Python's repr ('password': 'x') or of JSON
            # inside a JSON string (\"password\": \"x\"), as in exception messages.
            r"[\w.-]*)((?:'|\\\")?\s*[=:]\s*)"
            r"(\\\"(?:(?!\\\").)*\\\"|\"[^\"]*\"|'[^']*'|[^\s&;,]+)"
        ),
        r"\1\2" + REDACTED,
    ),
    # A command line's option naming a secret, with its value as the next argument:
    # --password x (never the flag after an option without a value: --password-stdin -u).
    (
        re.compile(
            r"(?i)((?<![\w-])--?[\w.-]*(?:pass(?:word|wd)?|secret|token|api[_-]?key|apikey"
            r"|credential)[\w.-]*\s+)(?!-)(\"[^\"]*\"|'[^']*'|\S+)"
        ),
        r"\1" + REDACTED,
    ),
    # The same names as JSON keys, quoted: {"DB_PASSWORD": "x"} (a payload in an SQL error).
    (
        re.compile(
            r"(?i)(\"[\w.-]*(?:pass(?:word|wd)?|secret|token|api[_-]?key|apikey|credential)"
            r"[\w.-]*\"\s*:\s*)\"(?:[^\"\\]|\\.)*\""
        ),
        r'\1"' + REDACTED + '"',
    ),
]


_SECRET_OPTION = re.compile(
    r"(?i)--?[\w.-]*(?:pass(?:word|wd)?|secret|token|api[_-]?key|apikey|credential)[\w.-]*\Z"
)

# Every pattern above needs one of these words; text with none of them (most of it) is
# returned after one search instead of a dozen substitutions.
_MAY_HOLD_SECRET = re.compile(
    r"(?i)-----BEGIN|bearer|basic|authorization|lgk_|prb_|lpk_|eyJ|AKIA|ASIA|sk-|gh[pousr]_|hf_|://"
    r"|pass|secret|token|api|credential"
)


@functools.lru_cache(maxsize=4096)
def is_secret_key(name: str) -> bool:
    """Whether a field name says its value is a secret (``api_key``, ``clientSecret``,
    ``password``…), judged by whole words so that ``input_tokens`` is not one."""
    words = [w for w in _SPLIT_WORDS.split(_SPLIT_CAMEL.sub("_", name).lower()) if w]
    if words == ["key"] or any(word in _SECRET_WORDS for word in words):
        return True
    # Run together (PGPASSWORD, adminpasswd), as the text patterns already catch them.
    if any(part in "".join(words) for part in _RUN_TOGETHER):
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def sanitise_text(text: str) -> str:
    if not _MAY_HOLD_SECRET.search(text):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def sanitise(value: Any, *, _depth: int = 0) -> Any:
    """A redacted copy of ``value`` (dicts, lists, strings; other scalars unchanged)."""
    if _depth > 32:
        return REDACTED
    if isinstance(value, str):
        return sanitise_text(value)
    if isinstance(value, dict):
        return {
            key: (
                REDACTED
                if isinstance(key, str) and is_secret_key(key) and value[key] not in (None, "")
                else sanitise(item, _depth=_depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        # An argument list: the value after an option naming a secret is that secret.
        return [
            REDACTED
            if index
            and isinstance(item, str)
            and not item.startswith("-")
            and isinstance(value[index - 1], str)
            and _SECRET_OPTION.match(value[index - 1])
            else sanitise(item, _depth=_depth + 1)
            for index, item in enumerate(value)
        ]
    return value
