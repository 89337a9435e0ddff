#!/usr/bin/env bash
# A long power-cut campaign: the simulation of tests/power_cut.rs over many more seeds than
# CI runs. Usage: scripts/power-cuts.sh [SEEDS] [CUTS_PER_SEED] [FIRST_SEED]
# (defaults: 20000 seeds, 20 cuts each, seeds from a random base). A failure prints the seed;
# FERRYFS_POWER_SEED=<seed> cargo test --release --test power_cut replays it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-20000}
cuts=${2:-20}
base=${3:-$(( (RANDOM << 16) | RANDOM ))}
echo "power-cut campaign: $seeds seeds x $cuts cuts, seeds from $base"
FERRYFS_POWER_SEEDS=$seeds FERRYFS_POWER_CUTS=$cuts FERRYFS_POWER_BASE=$base \
    cargo test --release --test power_cut -- --nocapture
