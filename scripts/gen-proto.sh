#!/usr/bin/env bash
# Regenerate envd's message and service modules from src/bilik/proto/*.proto.
#   scripts/gen-proto.sh [OUT_DIR]   (default: src/bilik/proto, where the output is committed)
# Needs Debian's protoc (protobuf-compiler) and the plugins from the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-src/bilik/proto}"
PATH="$PWD/.venv/bin:$PATH" protoc -I src/bilik/proto -I /usr/include --py_out="$out" --connectrpc_out="$out" \
  src/bilik/proto/process.proto src/bilik/proto/filesystem.proto
