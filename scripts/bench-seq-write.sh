#!/usr/bin/env bash
# Sequential write from a read-write handle, side by side: native, then each ferryfs build,
# interleaved round by round, each on a fresh pool and mount; each ferryfs figure is also
# printed as a ratio of the native run of its round.
#
#   scripts/bench-seq-write.sh                          # the checkout's build, 3 rounds of 1 GiB
#   BENCH_SEQ_BINS="/tmp/old /tmp/new" scripts/bench-seq-write.sh   # compare builds
#
# Environment (all optional):
#   BENCH_SEQ_BINS="PATH..."   ferryfs binaries to measure (default: build the checkout's)
#   BENCH_SEQ_ROUNDS=3         rounds
#   BENCH_SEQ_SIZE=1G          bytes written per run (fio 1 MiB blocks, end_fsync=1)
#   BENCH_DIR=DIR              where the temporary directories go (default: under /var/tmp)
#   BENCH_WARM_MIB=N           memory touched and freed before each run (default: twice the
#                              size + 512 MiB; 0: none; bench_warm_memory in lib/bench-common.sh)
#
# Needs root (FUSE mounts by root) and fio (scripts/deps.sh --bench installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh
ROUNDS=${BENCH_SEQ_ROUNDS:-3}
SIZE=${BENCH_SEQ_SIZE:-1G}
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
if [[ -z "${BENCH_SEQ_BINS:-}" ]]; then
    BENCH_SEQ_BINS=$(bench_checkout_build)
fi
read -r -a BINS <<<"$BENCH_SEQ_BINS"
command -v fio >/dev/null || scripts/deps.sh --bench >/dev/null
bench_workdir seq
cleanup() {
    bench_umount_pool
    rm -rf "$B"
}
trap cleanup EXIT INT TERM

# run DIR -> MiB/s of one fio sequential write into DIR
run() {
    sync
    bench_warm_memory "$SIZE_BYTES"
    fio --name=seq --directory="$1" --filename=seq.dat --ioengine=psync --rw=write --bs=1M \
        --size="$SIZE" --end_fsync=1 --output-format=json --output="$B/fio.json" >/dev/null
    python3 -c "import json; print('%.0f' % (json.load(open('$B/fio.json'))['jobs'][0]['write']['bw'] / 1024))"
}

printf '%-6s %-10s %s\n' round config "MiB/s (x native)"
for ((r = 1; r <= ROUNDS; r++)); do
    mkdir "$B/native"
    native=$(run "$B/native")
    rm -rf "$B/native"
    printf '%-6s %-10s %s\n' "$r" native "$native"
    i=0
    for bin in "${BINS[@]}"; do
        i=$((i + 1))
        # Room for the data set and its over-provisioned tail (images are sparse).
        bench_on_fresh_pool "$bin" "$((SIZE_BYTES * 3))" run
        mib=$BENCH_OUT
        printf '%-6s %-10s %s (%s)\n' "$r" "build$i" "$mib" "$(bench_ratio "$mib" "$native")"
    done
done
for ((i = 1; i <= ${#BINS[@]}; i++)); do echo "build$i = ${BINS[$((i - 1))]}"; done
