#!/usr/bin/env bash
# The Podman quadlet generator for machines whose Podman predates it (Debian 12 ships 4.3;
# quadlet arrived in 4.4). Downloads Debian 13's podman package with apt, using a private apt
# state directory so the machine's own sources are untouched, and extracts only the generator
# with dpkg -x. Idempotent: does nothing when a generator is already installed.
# Usage: scripts/install-quadlet.sh [DEST]   (default /opt/legator/quadlet; the binary ends up
# at DEST/quadlet, which is where `legator.deploy.quadlet.generator` looks, after
# $LEGER_QUADLET and /usr/libexec/podman/quadlet).
set -euo pipefail

DEST="${1:-/opt/legator/quadlet}"
if [ -x /usr/libexec/podman/quadlet ] || [ -x "$DEST/quadlet" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null || [ "$(id -u)" -ne 0 ]; then
  echo "install-quadlet: need root and apt-get to fetch Debian 13's podman; install Podman >= 4.4" >&2
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/preferences.d"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
touch "$work/status"
apt_opts=(
  -o "Dir::State=$work" -o "Dir::State::Lists=$work/lists" -o "Dir::State::status=$work/status"
  -o "Dir::Cache=$work/cache" -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null" -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
  -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" update -qq
(cd "$work" && apt-get "${apt_opts[@]}" download podman >/dev/null)
dpkg -x "$work"/podman_*.deb "$work/root"
mkdir -p "$DEST"
install -m 0755 "$work/root/usr/libexec/podman/quadlet" "$DEST/quadlet"
echo "install-quadlet: installed $DEST/quadlet"
