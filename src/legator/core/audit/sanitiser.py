"""Redacts secrets from anything bound for the audit log or the process log.

Three layers: values under a key that names a secret are replaced whole; every string (dict
keys too, and bytes, decoded) is scanned for secret-shaped substrings (bearer tokens, Legator
keys, JWTs, cloud and forge tokens, bare AWS secret keys, passwords in key=value pairs and URLs,
tokens as a URL's userinfo, chat webhook URLs, PEM private keys, cookies); and command lines, as
text or as argument lists, lose the values of the options that well-known programs take a
password in (``mysql -pX``, ``curl -u user:X``, ``sshpass -p X``, ``htpasswd -b f user X``…).

``clip_for_log(text, limit)`` is the way to shorten a text bound for a log line or the audit
log: it finds the secrets before it cuts.
"""

from __future__ import annotations

import functools
import itertools
import os.path
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

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

Redactor = Callable[[str], str]
MatchRedactor = Callable[[re.Match[str]], str]


@dataclass(frozen=True)
class _SecretOption:
    """A program's option whose value is a secret, or holds one after ``separator``."""

    flag: str
    glued: bool = True  # -pVALUE, or --flag=VALUE for a long one
    separate: bool = True  # -p VALUE
    separator: str = ""  # curl -u user:SECRET, smbclient -U user%SECRET

    @property
    def glued_prefix(self) -> str:
        return self.flag + "=" if self.flag.startswith("--") else self.flag

    def redact(self, value: str) -> str:
        quote = value[0] if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0] else ""
        inner = value[1:-1] if quote else value
        if self.separator:
            at = inner.find(self.separator)
            if at < 0:
                return value  # no secret given: the program asks for it
            inner = inner[: at + 1] + REDACTED
        else:
            inner = REDACTED
        return quote + inner + quote


# mysql reads "-p VALUE" as "ask for the password; VALUE is the database": only a glued value
# is a password there, and in 7-Zip's and RAR's -p.
_GLUED_P = (_SecretOption("-p", separate=False),)
_USER_COLON = (":",)
_PROGRAM_OPTIONS: dict[str, tuple[_SecretOption, ...]] = {
    **dict.fromkeys(
        (
            "mysql",
            "mysqldump",
            "mysqladmin",
            "mysqlimport",
            "mysqlcheck",
            "mysqlshow",
            "mysqlpump",
            "mysqlslap",
            "mariadb",
            "mariadb-dump",
            "mariadb-admin",
            "mariadb-import",
            "mariadb-check",
            "mariadb-show",
            "7z",
            "7za",
            "7zr",
            "7zz",
            "rar",
            "unrar",
        ),
        _GLUED_P,
    ),
    "sshpass": (_SecretOption("-p"),),
    "redis-cli": (_SecretOption("-a", glued=False),),
    **dict.fromkeys(
        (
            "ldapsearch",
            "ldapmodify",
            "ldapadd",
            "ldapdelete",
            "ldapwhoami",
            "ldappasswd",
            "ldapcompare",
            "ldapmodrdn",
            "ldapexop",
        ),
        (_SecretOption("-w"),),
    ),
    **dict.fromkeys(
        ("sqlcmd", "bcp", "ipmitool", "zip", "unzip"), (_SecretOption("-P", glued=False),)
    ),
    **dict.fromkeys(
        (
            "mongo",
            "mongosh",
            "mongodump",
            "mongorestore",
            "mongoexport",
            "mongoimport",
            "mongostat",
            "mongotop",
            "mongofiles",
        ),
        (_SecretOption("-p", glued=False),),
    ),
    **dict.fromkeys(
        ("docker login", "podman login", "nerdctl login", "buildah login", "skopeo login"),
        (_SecretOption("-p", glued=False),),
    ),
    "openssl": (_SecretOption("-k", glued=False), _SecretOption("-K", glued=False)),
    "curl": (
        *(_SecretOption(flag, separator=":") for flag in ("-u", "-U", "--user", "--proxy-user")),
        _SecretOption("--oauth2-bearer"),
    ),
    **dict.fromkeys(
        ("smbclient", "rpcclient", "smbcacls", "smbget"),
        tuple(_SecretOption(flag, separator="%") for flag in ("-U", "--user")),
    ),
}

_SHELL_WORD = r"(?:'[^']*'|\"[^\"]*\"|[^\s'\"]+|['\"])+"
_PROGRAM_NAMES = "|".join(
    re.escape(name).replace(r"\ ", r"\s+")
    for name in sorted(_PROGRAM_OPTIONS, key=len, reverse=True)
)
_PROGRAM_END = r"(?:\.exe)?(?![\w.:/-])"
# A program named in text, with the rest of its command: up to a separator outside quotes,
# or the next program named (sudo mysql …; curl … | mysql -pX). Case-sensitive: ignoring case
# made the scan six times slower, and these programs are spelt in lower case.
_COMMAND = re.compile(
    r"(?<![\w.-])(" + _PROGRAM_NAMES + ")" + _PROGRAM_END + r"((?:'[^'\n]*'|\"[^\"\n]*\""
    r"|(?!(?<![\w.-])(?:" + _PROGRAM_NAMES + ")" + _PROGRAM_END + r")[^\n;&|'\"]|['\"])*+)"
)


# What every program name holds (mysql for mysqldump, zip for unzip…): fewer searches.
_PROGRAM_WORDS = tuple(
    sorted(
        {
            word
            for word in (name.split()[0] for name in _PROGRAM_OPTIONS)
            if not any(other != word and other in word for other in _PROGRAM_OPTIONS)
        }
    )
)


def _option_redactor(options: tuple[_SecretOption, ...]) -> Callable[[str], str]:
    """Redacts the values of ``options`` in a command's arguments, given as text."""
    by_flag = {option.flag: option for option in options}
    forms = []
    for option in sorted(options, key=lambda option: len(option.flag), reverse=True):
        joins = []
        if option.glued:
            joins.append("=" if option.flag.startswith("--") else r"(?=\S)")
        if option.separate:
            joins.append(r"\s+(?!-)")
        forms.append(re.escape(option.flag) + "(?:" + "|".join(joins) + ")")
    pattern = re.compile(r"(?<![^\s'\"])(" + "|".join(forms) + ")(" + _SHELL_WORD + ")")

    def redact(match: re.Match[str]) -> str:
        option = by_flag[match[1].rstrip("= \t\r\n\f\v")]
        return match[1] + option.redact(match[2])

    return functools.partial(pattern.sub, redact)


_COMMAND_REDACTORS = {name: _option_redactor(options) for name, options in _PROGRAM_OPTIONS.items()}


def _redact_argument(
    word: str, options: Iterable[_SecretOption], pending: Redactor | None
) -> tuple[str, Redactor | None]:
    """``word`` of an argument list redacted, and how to redact the next one (the value of
    an option)."""
    if pending is not None and not word.startswith("-"):
        return pending(word), None
    for option in options:
        if word == option.flag:
            return word, option.redact if option.separate else None
        prefix = option.glued_prefix
        if option.glued and len(word) > len(prefix) and word.startswith(prefix):
            return prefix + option.redact(word[len(prefix) :]), None
    return word, None


def _redact_command(match: re.Match[str]) -> str:
    program = " ".join(match[1].split())
    return match[0][: match.start(2) - match.start()] + _COMMAND_REDACTORS[program](match[2])


# htpasswd takes its password as an argument, not an option's value: with -b (batch), it is
# the third word after the options (file, user, password), or the second with -n (no file).
_HTPASSWD_VALUED = "Cr"  # -C cost, -r rounds
_HTPASSWD = re.compile(
    r"(?<![\w.-])htpasswd(?:\.exe)?(?![\w.:/-])((?:'[^'\n]*'|\"[^\"\n]*\"|[^\n;&|'\"]|['\"])*+)"
)
_WORD = re.compile(_SHELL_WORD)


def _htpasswd_password(arguments: Sequence[object], start: int = 0) -> int | None:
    """Where among htpasswd's ``arguments`` (from ``start``) its password is, if they give
    one."""
    flags = ""
    index = start
    while index < len(arguments):
        word = arguments[index]
        if not isinstance(word, str) or not word.startswith("-") or word == "-":
            break
        index += 1
        if word == "--":
            break
        for at, flag in enumerate(word[1:], start=1):
            flags += flag
            if flag in _HTPASSWD_VALUED:
                if at == len(word) - 1:
                    index += 1  # -C 12: the value is the next word, not -C12's rest
                break
    if "b" not in flags:
        return None  # htpasswd asks for the password
    password = index + (1 if "n" in flags else 2)
    return password if password < len(arguments) else None


def _redact_htpasswd(match: re.Match[str]) -> str:
    words = list(_WORD.finditer(match[1]))
    at = _htpasswd_password([word[0] for word in words])
    if at is None:
        return match[0]
    start, end = (offset + match.start(1) - match.start() for offset in words[at].span())
    return match[0][:start] + REDACTED + match[0][end:]


# A name holding one of these words names a secret. Each name pattern below is a lookahead
# from the start of the whole name, then the name taken possessively, so that a long run of
# name characters is read once rather than once per position (which made 20 kB take seconds).
_NAME_WORDS = (
    r"(?:pass(?:word|wd)?|secret|token|api[_-]?key|apikey|credential|private[_-]?key"
    r"|access[_-]?key|signing[_-]?key|_pwd(?![\w.-]))"
)
_NAME = r"(?<![\w.-])(?=[\w.-]*?" + _NAME_WORDS + r")[\w.-]++"
# A quoted value may lack its closing quote where the text was cut: the rest is the secret.
_VALUE = r"(\\\"(?:(?!\\\").)*(?:\\\"|\Z)|\"[^\"]*(?:\"|\Z)|'[^']*(?:'|\Z)|[^\s&;,]+)"


class _Rule(NamedTuple):
    """A secret's pattern, what replaces it, and words (casefolded) that every match holds:
    a rule whose words are all absent from a text is not run on it, so most text is returned
    after a few substring searches."""

    words: tuple[str, ...]
    pattern: re.Pattern[str]
    replacement: str | MatchRedactor


_TOKEN_PREFIXES = (
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "sk-",
    "hf_",
    "npm_",
    "lgk_",
    "prb_",
    "lpk_",
)


def _is_token(userinfo: str) -> bool:
    """Whether a URL's userinfo without a password is a token rather than a user's name:
    a known token's prefix, or long and mixing letters with digits, or very long."""
    if userinfo.startswith(_TOKEN_PREFIXES) or len(userinfo) >= 32:
        return True
    return (
        len(userinfo) >= 20
        and any(c.isdigit() for c in userinfo)
        and any(c.isalpha() for c in userinfo)
    )


def _redact_token_userinfo(match: re.Match[str]) -> str:
    return match[1] + REDACTED + "@" if _is_token(match[2]) else match[0]


_NAMING_A_SECRET = (
    "pass",
    "secret",
    "token",
    "api",
    "credential",
    "private",
    "access",
    "signing",
    "_pwd",
)


def _rule(words: str | tuple[str, ...], pattern: str, replacement: str | MatchRedactor) -> _Rule:
    return _Rule((words,) if isinstance(words, str) else words, re.compile(pattern), replacement)


_RULES: list[_Rule] = [
    _rule(
        "-----begin",
        r"(?s)-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY( BLOCK)?-----.*?"
        r"(-----END \1PRIVATE KEY\2-----|$)",
        REDACTED,
    ),
    _Rule(_PROGRAM_WORDS, _COMMAND, _redact_command),
    _Rule(("htpasswd",), _HTPASSWD, _redact_htpasswd),
    # The Authorization header's value, whatever its scheme (Token, Bot, ApiKey…), or none;
    # first, so that Bearer and Basic below leave it as it is.
    _rule(
        "authorization",
        r"(?i)\b((?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)"
        r"(?!(?:[a-z][\w-]*\s+)?\[REDACTED\])"
        r"((?:bearer|basic|token|bot|apikey|api-key|key|digest|negotiate|hmac)\s+)?"
        r"[^\s,;\"']+",
        r"\1\2" + REDACTED,
    ),
    # A Cookie header's value is every session the client holds.
    _rule(
        "cookie",
        r"(?i)(?<![\w-])((?:set-)?cookie['\"]?\s*:\s*+['\"]?+)(?!\[REDACTED\])[^\r\n'\"]+",
        r"\1" + REDACTED,
    ),
    _rule(("bearer", "basic"), r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}", r"\1 " + REDACTED),
    _rule("lgk_", r"\blgk_[0-9a-fA-F]{8,}", "lgk_" + REDACTED),
    _rule("prb_", r"\bprb_[A-Za-z0-9_-]{8,}", "prb_" + REDACTED),
    _rule("lpk_", r"\blpk_[0-9a-fA-F]{8,}", "lpk_" + REDACTED),
    _rule("eyj", r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*", REDACTED),
    _rule(("akia", "asia"), r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", REDACTED),
    _rule(
        "aws_secret_access_key",
        r"(?i)(aws_secret_access_key\s*[=:]\s*)[A-Za-z0-9/+=]{40}",
        r"\1" + REDACTED,
    ),
    _rule("sk-", r"\b(sk-(?:ant-)?[A-Za-z0-9_-]{16,})", REDACTED),
    _rule(tuple(f"gh{kind}_" for kind in "pousr"), r"\b(gh[pousr]_[A-Za-z0-9]{20,})", REDACTED),
    _rule("github_pat_", r"\bgithub_pat_[A-Za-z0-9_]{20,}", REDACTED),
    _rule("glpat-", r"\bglpat-[A-Za-z0-9_-]{20,}", REDACTED),
    _rule("xox", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", REDACTED),
    _rule("aiza", r"\bAIza[A-Za-z0-9_-]{35}", REDACTED),
    _rule(("k_live_", "k_test_"), r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}", REDACTED),
    _rule("hf_", r"\b(hf_[A-Za-z0-9]{20,})", REDACTED),
    _rule("npm_", r"\bnpm_[A-Za-z0-9]{36}", REDACTED),
    # A signed URL's signature (S3, GCS, Azure SAS) lets anyone holding the URL use it.
    _rule(
        ("sig=", "signature="),
        r"(?i)([?&](?:sig|signature|x-amz-signature|x-goog-signature)=)[^&#\s]+",
        r"\1" + REDACTED,
    ),
    # A URL's password: the userinfo ends at the last '@' before the path, or, for a password
    # holding '/' (base64), at the first '@'. Not a port (host:8080/a@b), nor a query.
    _rule(
        "://",
        r"((?<![a-zA-Z0-9+.-])[a-zA-Z][a-zA-Z0-9+.-]*+://[^/?#\s:@]*:)"
        r"(?!\d*(?:[/?#\s]|\Z))(?:[^\s/?#]*|[^\s?#@:]+)@",
        r"\1" + REDACTED + "@",
    ),
    # A token alone as the userinfo (https://TOKEN@host/), as git and CI hand it around.
    _rule(
        "://",
        r"((?<![a-zA-Z0-9+.-])[a-zA-Z][a-zA-Z0-9+.-]*+://)([\w~+=-]++)@",
        _redact_token_userinfo,
    ),
    # A chat webhook's URL is its credential: its last part is the secret.
    _rule(
        "hooks.slack.com",
        r"(\bhooks\.slack\.com/(?:services/[\w-]+/[\w-]+|triggers/[\w-]+/[\w-]+"
        r"|workflows/[\w-]+/[\w-]+/[\w-]+)/)[\w-]+",
        r"\1" + REDACTED,
    ),
    _rule(
        "discord",
        r"(\bdiscord(?:app)?\.com/api/(?:v\d+/)?webhooks/\d+/)[\w-]+",
        r"\1" + REDACTED,
    ),
    _rule(
        _NAMING_A_SECRET,
        r"(?i)(" + _NAME + r")"
        # The name may end a quoted key of Python's repr ('password': 'x') or of JSON
        # inside a JSON string (\"password\": \"x\"), as in exception messages.
        r"((?:'|\\\")?\s*[=:]\s*)" + _VALUE,
        r"\1\2" + REDACTED,
    ),
    # A command line's option naming a secret, with its value as the next argument:
    # --password x (never the flag after an option without a value: --password-stdin -u).
    _rule(
        _NAMING_A_SECRET,
        r"(?i)((?<![\w.-])--?(?=[\w.-]*?" + _NAME_WORDS + r")[\w.-]++\s+)"
        r"(?!-)(\"[^\"]*(?:\"|\Z)|'[^']*(?:'|\Z)|\S+)",
        r"\1" + REDACTED,
    ),
    # The same names as JSON keys, quoted: {"DB_PASSWORD": "x"} (a payload in an SQL error).
    _rule(
        _NAMING_A_SECRET,
        r"(?i)(\"(?=[\w.-]*?" + _NAME_WORDS + r")[\w.-]++\"\s*:\s*)"
        r"\"(?:[^\"\\]|\\.)*+(?:\"|\Z)",
        r'\1"' + REDACTED + '"',
    ),
]


# An AWS secret access key needs no name before it to be one: 40 characters of its alphabet
# mixing upper and lower case with a digit, '/' or '+'. A hex hash (a git SHA-1) mixes no case.
_BARE_AWS_SECRET = re.compile(
    r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=]))"
    r"(?=[a-z0-9/+]{0,39}[A-Z])(?=[A-Z0-9/+]{0,39}[a-z])(?=[A-Za-z]{0,39}[0-9/+])"
    r"[A-Za-z0-9/+]{40}"
)
_AWS_SECRET_LENGTH = 40

_RULE_WORDS = frozenset(word for rule in _RULES for word in rule.words)
_ANY_RULE_WORD = re.compile("|".join(re.escape(word) for word in sorted(_RULE_WORDS)))

_SECRET_OPTION = re.compile(r"(?i)--?(?=[\w.-]*?" + _NAME_WORDS + r")[\w.-]++\Z")

# What a clipped string ends with (the audit log's details and log lines, the fleet
# protocol's text).
CLIP_MARK = "…[clipped]"
_CLIP_MARKS = (CLIP_MARK, " …[truncated]")
# How far past a cut clip_for_log scans: a secret straddling the cut is seen whole.
_CLIP_MARGIN = 4096
_UP_TO_LAST_SPACE = re.compile(r"(?s).*\s")
# Long enough for any token's least length, with a JWT's parts and a URL password's end.
_COMPLETION = "0" * 48 + ".000000.000000@x"


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
    # MYSQL_PWD, DB_PWD; but not PWD alone, the working directory.
    if len(words) > 1 and words[-1] == "pwd":
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def _sanitise_whole(text: str) -> str:
    # casefold, not lower: the rules' (?i) matches the long s for 's' and the Kelvin sign for
    # 'k'; only the dotless i it matches for 'i' survives casefolding.
    folded = text.casefold().replace("\u0131", "i")
    # Most text holds none of the words: a short one is cleared by one search, a long one by
    # a substring search per word (the search tries every word at every position).
    if len(folded) < 1024 and not _ANY_RULE_WORD.search(folded):
        return _redact_bare_keys(text)
    present = {word for word in _RULE_WORDS if word in folded}
    for rule in _RULES:
        if not present.isdisjoint(rule.words):
            text = rule.pattern.sub(rule.replacement, text)
    return _redact_bare_keys(text)


def _redact_bare_keys(text: str) -> str:
    if len(text) < _AWS_SECRET_LENGTH:
        return text
    return _BARE_AWS_SECRET.sub(REDACTED, text)


def sanitise_text(text: str) -> str:
    mark = next((mark for mark in _CLIP_MARKS if text.endswith(mark)), None)
    if mark is None:
        return _sanitise_whole(text)
    return _sanitise_clipped(text[: -len(mark)]) + mark


def _sanitise_clipped(text: str) -> str:
    """A clipped text: the cut may have left the first part of a secret, too short for its
    pattern (Bearer abc, lgk_12, eyJhbG, postgres://u:pa). Completed with what any secret
    could go on with, the text shows whether its last word is one: then that word goes."""
    text = _sanitise_whole(text)
    space = _UP_TO_LAST_SPACE.match(text)
    cut = space.end() if space else 0
    if cut == len(text) or text.endswith(REDACTED):
        return text
    if _sanitise_whole(text + _COMPLETION).startswith(text) and not _is_cut_key(text[cut:]):
        return text
    return text[:cut] + REDACTED


# The start of an AWS key id, or of a bare secret key (ten characters or more, mixing case):
# no completion makes these whole, for their patterns need the key to end where it does.
_CUT_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{0,15}\Z")
_CUT_SECRET_KEY = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{10,39}\Z")
_LOWER_THEN_UPPER = re.compile(r"[a-z].*[A-Z]")


def _is_cut_key(word: str) -> bool:
    """Whether a clipped text's last word may end in an AWS key cut short."""
    if _CUT_KEY_ID.search(word):
        return True
    cut = _CUT_SECRET_KEY.search(word)
    return cut is not None and _LOWER_THEN_UPPER.search(cut[0]) is not None


def _program_name(word: str) -> str:
    return os.path.basename(word).lower().removesuffix(".exe")


def _program_at(items: list[Any] | tuple[Any, ...], index: int) -> tuple[_SecretOption, ...]:
    """The secret options of the program that ``items[index]`` names, if it names one."""
    name = items[index]
    if not isinstance(name, str) or name.startswith("-"):
        return ()
    base = _program_name(name)
    following = items[index + 1] if index + 1 < len(items) else None
    if isinstance(following, str) and f"{base} {following}" in _PROGRAM_OPTIONS:
        return _PROGRAM_OPTIONS[f"{base} {following}"]
    return _PROGRAM_OPTIONS.get(base, ())


def _redact_whole(_value: str) -> str:
    return REDACTED


def _htpasswd_passwords(items: Sequence[Any]) -> set[int]:
    """Where htpasswd's password is in an argument list, if it names htpasswd and gives one."""
    found: set[int] = set()
    for index, item in enumerate(items):
        if isinstance(item, str) and "htpasswd" in item and _program_name(item) == "htpasswd":
            at = _htpasswd_password(items, index + 1)
            if at is not None:
                found.add(at)
    return found


def _sanitise_arguments(items: list[Any] | tuple[Any, ...], depth: int) -> Iterator[Any]:
    """An argument list's items: the value of an option naming a secret (--password x), or
    of a known program's password option (mysql -pX, curl -u user:x), is that secret."""
    options: tuple[_SecretOption, ...] = ()
    pending: Redactor | None = None
    passwords = _htpasswd_passwords(items)
    for index, item in enumerate(items):
        if index in passwords:
            pending = None
            yield REDACTED
            continue
        if not isinstance(item, str):
            pending = None
            yield sanitise(item, _depth=depth + 1)
            continue
        options = _program_at(items, index) or options
        word, after = _redact_argument(item, options, pending)
        if after is None and word == item and _SECRET_OPTION.match(item):
            after = _redact_whole
        pending = after
        yield sanitise_text(word)


@functools.lru_cache(maxsize=4096)
def _sanitise_key(key: str) -> str:
    return sanitise_text(key)  # field names repeat from event to event


def _sanitise_mapping(value: dict[Any, Any], depth: int) -> dict[Any, Any]:
    clean: dict[Any, Any] = {}
    for key, item in value.items():
        if isinstance(key, bytes):
            key = _decoded(key)
        if not isinstance(key, str):
            clean[key] = sanitise(item, _depth=depth + 1)
            continue
        secret = is_secret_key(key) and item not in (None, "")
        # The key itself may be a secret ({"Bearer …": 1}); two keys redacted alike must
        # both survive.
        name = _sanitise_key(key)
        unique, count = name, 1
        while unique in clean:
            count += 1
            unique = f"{name} ({count})"
        clean[unique] = REDACTED if secret else sanitise(item, _depth=depth + 1)
    return clean


def _decoded(raw: bytes | bytearray | memoryview) -> str:
    return bytes(raw).decode("utf-8", errors="replace")


def sanitise(value: Any, *, _depth: int = 0) -> Any:
    """A redacted copy of ``value``, JSON-able where ``value`` is: dicts, and lists, tuples,
    sets (as lists), strings and bytes (as text); other scalars unchanged."""
    if _depth > 32:
        return REDACTED
    if isinstance(value, str):
        return sanitise_text(value)
    if isinstance(value, dict):
        return _sanitise_mapping(value, _depth)
    if isinstance(value, list | tuple):
        return list(_sanitise_arguments(value, _depth))
    if isinstance(value, bytes | bytearray | memoryview):
        return sanitise_text(_decoded(value))
    if isinstance(value, set | frozenset):
        # Sorted: the same set gives the same list (and audit hash) in every process.
        return sorted((sanitise(item, _depth=_depth + 1) for item in value), key=repr)
    return value


def clip_for_log(text: str, limit: int) -> str:
    """``text`` sanitised, then, if longer than ``limit`` characters, cut to at most ``limit``
    with CLIP_MARK after: a cut made first could leave the start of a secret too short for its
    pattern. Only the first ``limit`` characters and a margin are scanned, so a huge text
    costs no more than a short one."""
    if len(text) <= limit:
        return sanitise_text(text)
    if len(text) > limit + _CLIP_MARGIN:
        scanned = text[: limit + _CLIP_MARGIN] + CLIP_MARK
        clean = sanitise_text(scanned).removesuffix(CLIP_MARK)
    else:
        clean = sanitise_text(text)
    clean = clean[:limit]
    # Not half a redaction mark: "[REDA" would read as if something else were there.
    mark_at = clean.rfind("[", max(0, limit - len(REDACTED) + 1))
    if mark_at >= 0 and REDACTED.startswith(clean[mark_at:]):
        clean = clean[:mark_at]
    return clean + CLIP_MARK
