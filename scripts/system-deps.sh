#!/usr/bin/env bash
# System packages the test suite and benchmarks use. Installs through apt when run as root
# on Debian/Ubuntu; elsewhere it lists what is missing and leaves the machine alone.
set -euo pipefail

PACKAGES=(
  postgresql-client  # pg_dump for `legator backup` on PostgreSQL
  wrk                # HTTP load generator for bench/
  systemd            # systemd-analyze verify checks the packaged units (tests/secrets)
  podman             # Deploy: real containers, secrets and volume export/import in tests
  runc               # Deploy: the OCI runtime Podman 4.3 needs here (crun fails on cgroups)
  busybox-static     # Deploy: the rootfs of the test image built with `podman import`
  g++                # llama-cpp-python (test extra) compiles llama.cpp from source
  cmake              # ditto
  nats-server        # Fleet: the private NATS servers tests stop and restart (replicas)
  chromium           # the web pages' browser tests (Playwright drives /usr/bin/chromium)
  time               # Fleet: the gate tests run GNU time's -o to show what it does
  dc                 # Fleet: the gate tests run dc's ! to show it runs a shell command
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# Deploy: the quadlet generator (Podman < 4.4 has none); idempotent.
quadlet() { "$(dirname "$0")/install-quadlet.sh" || echo "system-deps: quadlet generator not installed" >&2; }
if [ ${#missing[@]} -eq 0 ]; then quadlet; exit 0; fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${missing[*]} (install them, or run make as root on Debian)" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
quadlet
