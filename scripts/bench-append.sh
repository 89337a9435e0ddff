#!/usr/bin/env bash
# A journal's writer, side by side: 4 KiB appends, each followed by fdatasync (fio
# --fdatasync=1 --fallocate=none, so that every write grows the file), into a native
# directory, a bindfs mount of one, and each ferryfs build, interleaved round by round, each
# ferryfs build on a fresh pool and mount. Each figure is also printed as a ratio of the
# native run of its round.
#
#   scripts/bench-append.sh                                      # the checkout's build, 5 rounds
#   BENCH_APPEND_BINS="/tmp/old /tmp/new" scripts/bench-append.sh   # compare builds
#
# Environment (all optional):
#   BENCH_APPEND_BINS="PATH..."   ferryfs binaries to measure (default: build the checkout's)
#   BENCH_APPEND_ROUNDS=5         rounds
#   BENCH_APPEND_SECS=5           seconds of each run (after a 1 s ramp)
#   BENCH_DIR=DIR                 where the temporary directories go (default: under /var/tmp)
#
# Needs root (FUSE mounts by root), fio and bindfs (scripts/deps.sh --bench installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh
ROUNDS=${BENCH_APPEND_ROUNDS:-5}
SECS=${BENCH_APPEND_SECS:-5}
if [[ -z "${BENCH_APPEND_BINS:-}" ]]; then
    BENCH_APPEND_BINS=$(bench_checkout_build)
fi
read -r -a BINS <<<"$BENCH_APPEND_BINS"
{ command -v fio && command -v bindfs; } >/dev/null || scripts/deps.sh --bench >/dev/null
bench_workdir append
cleanup() {
    bench_umount_pool
    if mountpoint -q "$B/bmnt"; then
        fusermount3 -u "$B/bmnt" 2>/dev/null || umount -l "$B/bmnt" || true
    fi
    rm -rf "$B"
}
trap cleanup EXIT INT TERM

# run DIR -> IOPS of one appender into DIR
run() {
    rm -f "$1/append.dat"
    sync
    fio --name=append --directory="$1" --filename=append.dat --ioengine=psync --rw=write --bs=4k \
        --size=256M --fallocate=none --fdatasync=1 --time_based --runtime="$SECS" --ramp_time=1 \
        --output-format=json --output="$B/fio.json" >/dev/null
    rm -f "$1/append.dat"
    python3 -c "import json; print('%.0f' % json.load(open('$B/fio.json'))['jobs'][0]['write']['iops'])"
}

mkdir "$B/native" "$B/bsrc" "$B/bmnt"
bindfs "$B/bsrc" "$B/bmnt"
printf '%-6s %-10s %s\n' round config "IOPS (x native)"
for ((r = 1; r <= ROUNDS; r++)); do
    native=$(run "$B/native")
    printf '%-6s %-10s %s\n' "$r" native "$native"
    bind=$(run "$B/bmnt")
    printf '%-6s %-10s %s (%s)\n' "$r" bindfs "$bind" "$(bench_ratio "$bind" "$native")"
    i=0
    for bin in "${BINS[@]}"; do
        i=$((i + 1))
        bench_on_fresh_pool "$bin" 2G run
        iops=$BENCH_OUT
        printf '%-6s %-10s %s (%s)\n' "$r" "build$i" "$iops" "$(bench_ratio "$iops" "$native")"
    done
done
for ((i = 1; i <= ${#BINS[@]}; i++)); do echo "build$i = ${BINS[$((i - 1))]}"; done
