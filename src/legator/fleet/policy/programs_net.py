"""Rules for network clients and configuration: curl, wget, ip, tcpdump, ncat, nmap and
openssl."""

from __future__ import annotations

from collections.abc import Callable

from legator.fleet.policy.levels import DIAGNOSE, OBSERVE, REMEDIATE
from legator.fleet.policy.options import Syntax, names, parse, unless_given

_CURL = Syntax(
    short_values="AbCcDdEeFHKmoPQrTtuUwXxYyz",
    long_values=names(
        "output output-dir upload-file data data-ascii data-binary data-raw data-urlencode "
        "form form-string json config cookie-jar dump-header trace trace-ascii stderr "
        "libcurl etag-save hsts alt-svc engine quote request write-out user-agent header "
        "cookie user proxy referer max-time connect-timeout cacert cert key resolve "
        "connect-to url range retry unix-socket abstract-unix-socket proxy-user interface "
        "max-filesize limit-rate continue-at ssl-sessions variable expand-data "
        "expand-output expand-url"
    ),
    long_flags=names(
        "remote-name remote-name-all create-dirs silent show-error location insecure fail "
        "include head get verbose compressed remote-time remote-header-name trace-time"
    ),
)
# Options that write a file, send data, run something or read a config that may do so.
_CURL_WRITES = frozenset(
    "--" + name
    for name in (
        "output", "output-dir", "remote-name", "remote-name-all", "create-dirs", "upload-file",
        "data", "data-ascii", "data-binary", "data-raw", "data-urlencode", "form",
        "form-string", "json", "config", "cookie-jar", "dump-header", "trace", "trace-ascii",
        "stderr", "libcurl", "etag-save", "hsts", "alt-svc", "engine", "quote",
        "ssl-sessions", "expand-data", "expand-output",
    )
) | {"-o", "-O", "-T", "-d", "-F", "-K", "-c", "-D", "-Q"}  # fmt: skip
_CURL_SCHEMES = ("gopher:", "gophers:", "dict:", "telnet:", "smtp:", "smtps:", "ldap:", "mqtt:")


def _curl(args: list[str]) -> str:
    parsed = parse(args, _CURL)
    if parsed.has(*_CURL_WRITES):
        return REMEDIATE
    if any(v is None or v.upper() not in ("GET", "HEAD") for v in parsed.values("-X", "--request")):
        return REMEDIATE
    if any(v is None or "%output{" in v for v in parsed.values("-w", "--write-out")):
        return REMEDIATE  # --write-out '%output{file}' writes a file
    if any(word.lower().startswith(_CURL_SCHEMES) for word in parsed.words):
        return REMEDIATE  # raw protocols can send anything to any service
    return DIAGNOSE


_WGET = Syntax(
    short_values="aABDeIilnOoPQRtTUwX",
    long_values=names(
        "output-document output-file append-output directory-prefix execute config "
        "post-data post-file body-data body-file method save-cookies warc-file rejected-log "
        "use-askpass hsts-file input-file tries timeout user-agent header user password "
        "level wait quota"
    ),
    long_flags=names(
        "spider quiet no-verbose verbose recursive mirror page-requisites convert-links "
        "backup-converted background server-response no-check-certificate continue "
        "timestamping"
    ),
)
_WGET_WRITES = frozenset(
    "--" + name
    for name in (
        "output-file", "append-output", "directory-prefix", "execute", "config", "post-data",
        "post-file", "body-data", "body-file", "save-cookies", "warc-file", "rejected-log",
        "use-askpass", "hsts-file", "recursive", "mirror", "page-requisites", "convert-links",
        "backup-converted", "background",
    )
) | {"-o", "-a", "-P", "-e", "-r", "-m", "-p", "-k", "-K", "-b"}  # fmt: skip


def _wget(args: list[str]) -> str:
    parsed = parse(args, _WGET)
    if parsed.has(*_WGET_WRITES):
        return REMEDIATE
    if any(v is None or v.upper() not in ("GET", "HEAD") for v in parsed.values("--method")):
        return REMEDIATE
    documents = parsed.values("-O", "--output-document")
    if documents:  # the last one wins; "-" is standard output
        return DIAGNOSE if documents[-1] == "-" else REMEDIATE
    return DIAGNOSE if parsed.has("--spider") else REMEDIATE  # by default it saves a file


# ip reads its options in this order, each matched by any prefix ("-b" is -batch, "-br"
# -brief, "-f" -family); True: takes a value, None: runs commands from a file or forces.
_IP_OPTIONS: tuple[tuple[str, bool | None], ...] = (
    ("-loops", True), ("-family", True), ("-4", False), ("-6", False), ("-0", False),
    ("-M", False), ("-B", False), ("-stats", False), ("-statistics", False),
    ("-details", False), ("-resolve", False), ("-oneline", False), ("-timestamp", False),
    ("-tshort", False), ("-Version", False), ("-force", None), ("-batch", None),
    ("-brief", False), ("-json", False), ("-pretty", False), ("-rcvbuf", True),
    ("-color", False), ("-help", False), ("-human", False), ("-iec", False),
    ("-netns", True), ("-Numeric", False), ("-all", False), ("-echo", False),
)  # fmt: skip


def _ip(args: list[str]) -> str:
    rest = list(args)
    while rest and rest[0].startswith("-") and rest[0] != "-":
        option = rest.pop(0)
        if option == "--":
            break
        option = (option[1:] if option.startswith("--") else option).split("=", 1)[0]
        match = next((takes for name, takes in _IP_OPTIONS if name.startswith(option)), False)
        if match is None or len(option) < 2:
            return REMEDIATE
        if match and rest:
            rest.pop(0)
        if not any(name.startswith(option) for name, _ in _IP_OPTIONS):
            return REMEDIATE
    words = [a for a in rest if not a.startswith("-")]
    if len(words) <= 1 or words[1] in ("show", "list", "ls", "get", "lst", "sh"):
        return OBSERVE
    return REMEDIATE


_TCPDUMP = Syntax(short_values="BcCEFGijMmrsTVwWyzZQ")


# -w writes a capture file; -z runs a command on each file it rotates.
_tcpdump = unless_given(_TCPDUMP, ("-w", "-z"))


_NCAT = Syntax(
    short_values="cegGimopsdwx",
    long_values=names("exec sh-exec lua-exec output hex-dump"),
    long_flags=names("append-output"),
)
_NCAT_WRITES = frozenset(
    {"-e", "-c", "-o", "-x", "--exec", "--sh-exec", "--lua-exec", "--output", "--hex-dump",
     "--append-output"}
)  # fmt: skip
_ncat = unless_given(_NCAT, _NCAT_WRITES)


# nmap reads long options with one dash too; these run scripts (NSE is Lua with os.execute)
# or read or write files.
_NMAP_LONG = ("script", "append-output", "resume", "datadir", "servicedb", "versiondb")


def _nmap(args: list[str]) -> str:
    for arg in args:
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("-") or not name:
            continue
        if len(name) >= 3 and any(option.startswith(name) for option in _NMAP_LONG):
            return REMEDIATE
        if name.startswith("script") or name == "A" or (name[0] == "s" and "C" in name):
            return REMEDIATE  # -A and -sC run the default scripts
        if name[0] == "o" and name[1:2] in tuple("NXSGAMH"):
            return REMEDIATE  # -oN FILE…
    return DIAGNOSE


# openssl subcommands that only read or print (what they write goes to standard output), and
# the options (one or two dashes, ``-opt=value`` too) that write files or load code.
_OPENSSL_READ = frozenset(
    {"version", "s_client", "x509", "verify", "ciphers", "list", "crl", "asn1parse", "dgst",
     "sess_id", "errstr", "help", "pkey", "rsa", "ec", "pkcs7", "rand", "base64", "enc",
     "md5", "sha1", "sha256", "sha384", "sha512"}
)  # fmt: skip
_OPENSSL_WRITES = frozenset(
    {"out", "keyout", "engine", "provider", "provider-path", "sess_out", "keylogfile",
     "msgfile", "writerand", "CA", "CAserial", "CAcreateserial", "config"}
)  # fmt: skip


def _openssl(args: list[str]) -> str:
    if not args or args[0] not in _OPENSSL_READ:
        return REMEDIATE
    for arg in args[1:]:
        if arg.startswith("-") and arg.lstrip("-").split("=", 1)[0] in _OPENSSL_WRITES:
            return REMEDIATE
    return DIAGNOSE


RULES: dict[str, Callable[[list[str]], str]] = {
    "curl": _curl,
    "wget": _wget,
    "ip": _ip,
    "tcpdump": _tcpdump,
    "ncat": _ncat,
    "nmap": _nmap,
    "openssl": _openssl,
}
