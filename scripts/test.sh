#!/usr/bin/env bash
# The tests: unit tests, and integration tests that mount real FUSE file systems in temp
# directories. Installs what they need first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --release --no-fail-fast "$@"
else
    cargo test --release --no-fail-fast "$@"
fi
