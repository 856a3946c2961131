"""The sanitiser: every secret shape is redacted, ordinary text is left alone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from legator.core.audit import sanitiser
from legator.core.audit.sanitiser import REDACTED, is_secret_key, sanitise, sanitise_text

KEY = "lgk_" + "ab12" * 16
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc\n-----END RSA PRIVATE KEY-----"
SECRETS = [
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz"),
    (f"key={KEY}", KEY[4:]),
    (f"token {JWT}", JWT),
    ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
    ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
    ("postgres://app:s3cr3tpw@db:5432/x", "s3cr3tpw"),
    ("https://svc:ab/cd+ef==@proxy.example/v1", "ab/cd+ef=="),  # base64 holds '/'
    ("Authorization: Token 9f86d081884c7d65", "9f86d081884c7d65"),
    ("authorization=abc123xyz", "abc123xyz"),
    ("{'Authorization': 'Bot MTIz.NDU2'}", "MTIz.NDU2"),
    ("login password=hunter2 ok", "hunter2"),
    ('DB_PASSWORD="two words"', "two words"),
    ("api_key: sk-abcdefghijklmnopqrstuv", "sk-abcdefghijklmnopqrstuv"),
    (PEM, "MIIEow"),
    ("probe key lpk_" + "cd34" * 16, "cd34" * 16),
    ('[parameters: (\'{"env": {"DB_PASSWORD": "hunter2 \\"x\\""}}\',)]', "hunter2"),
]


def test_each_secret_shape_is_redacted() -> None:
    for text, secret in SECRETS:
        cleaned = sanitise_text(text)
        assert secret not in cleaned, text
        assert REDACTED in cleaned


def test_redacted_text_stays_as_it_is() -> None:
    """The log pipeline may see text the audit layer already redacted."""
    for text, _ in SECRETS:
        once = sanitise_text(text)
        assert sanitise_text(once) == once, text


def test_ordinary_text_is_untouched() -> None:
    ordinary = ["systemctl restart nginx", "ls -la /var/log", "tokens used: 42", "keyboard"]
    for text in [*ordinary, "Authorization failed for alice", "see http://x.example/a@b"]:
        assert sanitise_text(text) == text


def test_secret_keys_in_structures() -> None:
    value = {
        "password": "x",
        "nested": {"clientSecret": "y", "items": [{"api_key": "z", "input_tokens": 5}]},
        "empty_token": "",
    }
    assert sanitise(value) == {
        "password": REDACTED,
        "nested": {"clientSecret": REDACTED, "items": [{"api_key": REDACTED, "input_tokens": 5}]},
        "empty_token": "",
    }
    assert not is_secret_key("monkey") and not is_secret_key("keys") and is_secret_key("x-api-key")


@given(
    prefix=st.text(max_size=40),
    suffix=st.text(max_size=40),
    body=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)
def test_embedded_keys_never_survive(prefix: str, suffix: str, body: str) -> None:
    key = "lgk_" + body
    assert body not in sanitise_text(prefix + " " + key + " " + suffix)


_FRAGMENTS = [text for text, _ in SECRETS] + [
    "uptime",
    "BEARER  abcdefgh12345678",
    "Basic dXNlcjpwYXNz",
    "prb_abcdefgh1234",
    "lpk_abcdef12",
    '{"api_token": "a b"}',
    "ghp_" + "a" * 24,
    "hf_" + "b" * 24,
    "x://u:p@h",
    "PassWd : 'q r'",
    "ApiKey=zz",
    "credential;x",
    "ASIA" + "B" * 16,
    "SK-notakey",
    "Authorization: Token x",
    "Proxy-Authorization: Digest y",
    "mysql -pS3cret",
    "curl -u bob:pw",
    "docker login -p",
    "Cookie: a=b",
    "glpat-" + "c" * 20,
    "xoxb-1234567890",
    "sk_live_" + "d" * 16,
    "MYSQL_PWD=x",
    "?a=1&sig=x",
    "npm_" + "e" * 36,
    "signing_key: k",
    "private_key='k'",
    "\u017fecret=1",  # (?i) matches the long s for 's'
    "credent\u0131al=1",  # and the dotless i for 'i'
]


@given(st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=12), max_size=6))
def test_the_quick_check_never_skips_a_secret(parts: list[str]) -> None:
    """A rule skipped for want of its words in the text is one that would leave it unchanged."""
    text = " ".join(parts)
    scanned = text
    for rule in sanitiser._RULES:
        scanned = rule.pattern.sub(rule.replacement, scanned)
    assert sanitise_text(text) == scanned


def test_the_log_pipeline_redacts_every_field_but_its_own() -> None:
    from legator.core.logging import _sanitise

    key = "lgk_" + "ab" * 32
    event = {
        "event": f"calling with Bearer {key}",
        "path": f"/x?api_key={key}",
        "password": "hunter2hunter2",
        "timestamp": "2026-11-25T02:50:00Z",
        "level": "info",
        "logger": "legator.access",
    }
    clean = _sanitise(None, "info", dict(event))
    assert key not in repr(clean) and "hunter2" not in repr(clean)
    assert clean["password"] == REDACTED
    assert {k: clean[k] for k in ("timestamp", "level", "logger")} == {
        k: event[k] for k in ("timestamp", "level", "logger")
    }
