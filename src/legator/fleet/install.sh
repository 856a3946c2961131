#!/bin/sh
# Legator probe installer, served by the control plane at /install.sh.
#   export LEGATOR_TOKEN=prb_...
#   curl -fsSL https://legator.example/install.sh | sudo --preserve-env=LEGATOR_TOKEN sh -s -- --server URL
# The token: $LEGATOR_TOKEN, --token-file FILE, or a hidden prompt on the terminal;
# --token T still works but shows the token in `ps` to every user. It reaches
# legator-probe init through the environment only, never a command line.
# Options: --server URL [--token-file FILE] [--tags a,b] [--arch ARCH] [--version V]
#          [--config-dir DIR] [--max-level observe|diagnose|remediate] [--allow-updates]
#          [--no-start]   (--allow-updates: self-updates below remediate, see docs/fleet.md)
# LEGATOR_ROOT (default /) installs into another root; used by tests.
set -eu

# Only legator-probe init gets the token (below); no other command inherits it.
TOKEN="${LEGATOR_TOKEN:-}"
unset LEGATOR_TOKEN
SERVER="" TOKEN_FILE="" TAGS="" ARCH="$(uname -m)" VERSION="@VERSION@" CONFIG_DIR="" START=1
MAX_LEVEL="diagnose"
UPDATES=""
ROOT="${LEGATOR_ROOT:-}"
PYTHON="${LEGATOR_PYTHON:-python3}"

die() { echo "legator-install: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --server) SERVER="${2:?--server needs a URL}"; shift 2 ;;
        --token) TOKEN="${2:?--token needs a value}"; shift 2 ;;  # visible in ps
        --token-file) TOKEN_FILE="${2:?--token-file needs a path}"; shift 2 ;;
        --tags) TAGS="${2:-}"; shift 2 ;;
        --arch) ARCH="${2:?--arch needs a value}"; shift 2 ;;
        --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
        --config-dir) CONFIG_DIR="${2:?--config-dir needs a path}"; shift 2 ;;
        --max-level) MAX_LEVEL="${2:?--max-level needs a level}"; shift 2 ;;
        --allow-updates) UPDATES="--allow-updates"; shift ;;
        --no-start) START=0; shift ;;
        -h|--help) sed -n '2,11p' "$0" 2>/dev/null || true; exit 0 ;;
        *) die "unknown option: $1" ;;
    esac
done

[ -n "$SERVER" ] || die "--server is required"
if [ -n "$TOKEN_FILE" ]; then
    [ -r "$TOKEN_FILE" ] || die "--token-file: cannot read $TOKEN_FILE"
    read -r TOKEN < "$TOKEN_FILE" || true
elif [ -z "$TOKEN" ] && ( : </dev/tty ) 2>/dev/null; then
    # stdin is this script (curl | sh): ask on the terminal, without echo.
    printf 'enrolment token (prb_...): ' >/dev/tty
    stty -echo </dev/tty 2>/dev/null || true
    read -r TOKEN </dev/tty || true
    stty echo </dev/tty 2>/dev/null || true
    printf '\n' >/dev/tty
fi
TOKEN="${TOKEN%"$(printf '\r')"}"  # a file saved with CRLF
[ -n "$TOKEN" ] || die "an enrolment token is required: set LEGATOR_TOKEN (sudo --preserve-env=LEGATOR_TOKEN) or give --token-file FILE"
case "$SERVER" in http://*|https://*) ;; *) die "--server must be an http(s) URL" ;; esac
case "$ARCH" in x86_64|amd64|aarch64|arm64|armv7l|riscv64|ppc64le|s390x) ;; *) die "unsupported architecture: $ARCH" ;; esac
case "$MAX_LEVEL" in observe|diagnose|remediate) ;; *) die "--max-level must be observe, diagnose or remediate" ;; esac
[ -n "$CONFIG_DIR" ] || CONFIG_DIR="/etc/legator"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 >= 3.11 is required"
"$PYTHON" -c 'import pydantic, websockets, psutil, yaml, typer' 2>/dev/null \
    || die "python3 needs pydantic, websockets, psutil, pyyaml and typer (e.g. apt install python3-pydantic python3-websockets python3-psutil python3-yaml python3-typer)"

LIB="$ROOT/opt/legator"
PYZ="$LIB/legator-probe.pyz"
UNIT="$ROOT/etc/systemd/system/legator-probe.service"
CONF="$ROOT$CONFIG_DIR"

if [ -z "$ROOT" ] && ! id legator >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/legator --shell /usr/sbin/nologin legator
fi
mkdir -p "$LIB" "$CONF" "$ROOT/var/lib/legator" "$(dirname "$UNIT")"
chmod 0750 "$CONF"

echo "downloading legator-probe $VERSION for $ARCH"
"$PYTHON" - "$SERVER/download/legator-probe-$VERSION.pyz" "$PYZ.new" <<'PY'
import hashlib, sys, urllib.request
url, target = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(url, timeout=60) as response:
    data = response.read()
    expected = response.headers.get("X-Checksum-SHA256")
if expected and hashlib.sha256(data).hexdigest() != expected:
    sys.exit("checksum mismatch for " + url)
with open(target, "wb") as handle:
    handle.write(data)
PY
chmod 0755 "$PYZ.new"
mv -f "$PYZ.new" "$PYZ"

cat > "$UNIT" <<UNIT
[Unit]
Description=Legator probe
Documentation=$SERVER/docs
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=/usr/bin/env python3 /opt/legator/legator-probe.pyz run --config $CONFIG_DIR/probe.yaml
Restart=always
RestartSec=5
User=root
NoNewPrivileges=yes
PrivateTmp=yes
ProtectHome=read-only
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictRealtime=yes
ReadWritePaths=$CONFIG_DIR /var/lib/legator /opt/legator

[Install]
WantedBy=multi-user.target
UNIT

set -- init --server "$SERVER" --config-dir "$CONF" --max-level "$MAX_LEVEL"
[ -n "$TAGS" ] && set -- "$@" --tags "$TAGS"
[ -n "$UPDATES" ] && set -- "$@" "$UPDATES"
# The token through the environment of this one command (readable only by its user and
# root), never its arguments (readable by every user in /proc/*/cmdline and ps).
LEGATOR_TOKEN="$TOKEN" "$PYTHON" "$PYZ" "$@"

systemctl daemon-reload
systemctl enable legator-probe.service
if [ "$START" = 1 ]; then
    systemctl restart legator-probe.service
    echo "legator-probe installed and started"
else
    echo "legator-probe installed (not started: --no-start)"
fi
