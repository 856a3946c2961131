#!/usr/bin/env bash
# System packages the test suite and benchmarks use. Installs through apt when run as root
# on Debian/Ubuntu; elsewhere it lists what is missing and leaves the machine alone.
set -euo pipefail

PACKAGES=(
  postgresql-client  # pg_dump for `legator backup` on PostgreSQL
  wrk                # HTTP load generator for bench/
  g++                # llama-cpp-python (test extra) compiles llama.cpp from source
  cmake              # ditto
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${missing[*]} (install them, or run make as root on Debian)" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
