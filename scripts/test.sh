#!/usr/bin/env bash
# Install bilik with its test tools, then run every check: lint, format, types and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
.venv/bin/ruff check src tests bench examples
.venv/bin/ruff format --check src tests bench examples
.venv/bin/mypy
.venv/bin/pytest "$@"
