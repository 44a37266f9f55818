#!/usr/bin/env bash
# Install bilik and everything it needs on Debian 12, as root. Idempotent.
#   scripts/install.sh          the server
#   scripts/install.sh --test   the server and the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (bilik manages namespaces, cgroups and mounts)" >&2
  exit 1
fi

packages=(
  # OCI runtimes: crun (default), gVisor's runsc (with gcc for its statx shim, gvisor_statx.c)
  crun runsc gcc
  # images, disks, networking
  mmdebstrap e2fsprogs util-linux nftables iproute2
  # what every sandbox gets from the host, independent of its image: PID 1 and a shell (static
  # builds), and a Python for in-sandbox agents (patched to load only its own libraries)
  tini busybox-static patchelf
  # /proc/meminfo, /proc/cpuinfo, ... as a sandbox's own limits show them (FUSE, one per server)
  lxcfs
  # envd joins sandboxes from the host with their own seccomp filter (libseccomp, as crun does)
  libseccomp2
  # templates from OCI registries: pulled by skopeo, unpacked by umoci
  skopeo umoci
  # the server
  python3 python3-venv ca-certificates curl
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

extra=""
if [ "${1:-}" = "--test" ]; then
  extra="[test]"
  # the suite runs the store against a real PostgreSQL, which it starts itself
  missing=()
  # and regenerates envd's protocol modules to check they match the .proto files
  # and pulls template images from a registry of its own (docker-registry, on loopback)
  for p in postgresql protobuf-compiler libprotobuf-dev docker-registry; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  # and drives bilik with the official JS SDKs under node's test runner (a node that comes
  # with npm, as NodeSource's does, needs no npm package)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || [ -e /usr/lib/node_modules/npm ] || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  # The package starts a registry of its own on port 5000; the tests start theirs.
  if command -v systemctl >/dev/null && systemctl is-enabled docker-registry >/dev/null 2>&1; then
    systemctl disable --now docker-registry || true
  fi
fi
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
if [ -z "$extra" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e .
else
  # The official SDKs the suite is a client with, pinned: the newest tested in .venv, the
  # oldest supported in .venv-oldest (tests/test_oldest_sdk.py runs a part of the suite there).
  .venv/bin/pip install -q --disable-pip-version-check -e ".${extra}" -c tests/constraints.txt
  [ -x .venv-oldest/bin/python ] || /usr/bin/python3 -m venv .venv-oldest
  .venv-oldest/bin/pip install -q --disable-pip-version-check -e ".${extra}" \
    -c tests/constraints-oldest.txt
  # An older official SDK (it creates with POST /sandboxes), in a venv of its own.
  [ -x .venv-e2b-2.20/bin/python ] || /usr/bin/python3 -m venv .venv-e2b-2.20
  .venv-e2b-2.20/bin/pip install -q --disable-pip-version-check "e2b==2.20.0"
  # The official JS SDKs, at the versions tests/js/package-lock.json pins.
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
fi
ln -sf "$PWD/.venv/bin/bilik" /usr/local/bin/bilik
echo "bilik installed: $(command -v bilik)"
