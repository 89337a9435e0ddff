#!/usr/bin/env bash
# The demo: builds ferryfs, then runs `ferryfs demo` on a temporary pool.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --quiet
exec target/release/ferryfs demo "$@"
