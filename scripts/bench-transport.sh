#!/usr/bin/env bash
# The kernel's two FUSE transports side by side on small requests: the classic one (read(2) of
# a request from /dev/fuse, writev(2) of the reply) against FUSE-over-io_uring (Linux 6.14+,
# CONFIG_FUSE_IO_URING). A trivial in-memory file system speaking the raw protocol
# (bench/fuse-transport, no ferryfs involved) serves, in a fresh process and mount per run:
# create+close / stat / unlink of many files from one thread, and 4 KiB random pwrite() from 1
# and from 4 threads. Setups: classic with 1 reader thread, with 2, with 2 pinned to CPUs
# (thread i on CPU i mod ncpus, as the io_uring queue threads always are), and io_uring (one
# queue per CPU). Setups alternate within each workload, the first one rotating every
# repetition. Prints ops/s, FUSE requests per op and daemon / process CPU µs per op, every
# run and then the medians.
#
#   scripts/bench-transport.sh
#   BENCH_TRANSPORT_REPS=3 BENCH_TRANSPORT_SECS=3 scripts/bench-transport.sh
#
# Environment (all optional):
#   BENCH_TRANSPORT_REPS=5         repetitions of the whole matrix
#   BENCH_TRANSPORT_FILES=20000    files of the create/stat/unlink workload
#   BENCH_TRANSPORT_SECS=5         seconds of each pwrite workload
#   BENCH_TRANSPORT_ENTRIES=8      io_uring ring entries per queue
#   BENCH_TRANSPORT_CONFIGS=LIST   setups, comma-separated (default:
#                                  classic-t1,classic-t2,uring,classic-t2-pinned)
#   BENCH_DIR=DIR                  where the temporary directory goes (default: under /var/tmp)
#   BENCH_KEEP_RESULTS=FILE        keep the probe's raw output (every run's INFO/PHASE lines)
#
# For the run it sets /sys/module/fuse/parameters/enable_uring to Y, and restores it at exit.
# Without that parameter (a kernel built without CONFIG_FUSE_IO_URING) only the classic setups
# run, and the script says so and exits 3; it also exits 3 if the kernel refuses io_uring at
# INIT (the probe's UNAVAILABLE lines: those rows are not measured, never measured as classic).
#
# Needs root (the probe calls mount(2) itself) and cargo (it builds bench/fuse-transport).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh
REPS=${BENCH_TRANSPORT_REPS:-5}
FILES=${BENCH_TRANSPORT_FILES:-20000}
SECS=${BENCH_TRANSPORT_SECS:-5}
ENTRIES=${BENCH_TRANSPORT_ENTRIES:-8}
CONFIGS=${BENCH_TRANSPORT_CONFIGS:-classic-t1,classic-t2,uring,classic-t2-pinned}
PARAM=/sys/module/fuse/parameters/enable_uring
[[ $(id -u) == 0 ]] || { echo "bench-transport.sh: needs root (the probe mounts with mount(2))" >&2; exit 2; }
for v in REPS FILES SECS ENTRIES; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "bench-transport.sh: BENCH_TRANSPORT_$v must be a positive integer" >&2; exit 2; }
done

cargo build --release --locked --quiet --manifest-path bench/fuse-transport/Cargo.toml
PROBE=bench/fuse-transport/target/release/fuse-transport-probe

# Remove every fuse.ferryprobe mount (the probe removes its own; this is for a probe that
# was killed with SIGKILL): abort the connection, then detach.
remove_probe_mounts() {
    local conn mp
    awk '/ - fuse\.ferryprobe / {split($3, a, ":"); print a[2], $5}' /proc/self/mountinfo |
        while read -r conn mp; do
            mp=$(printf '%b' "$mp") # mountinfo escapes blanks as \040
            echo 1 >"/sys/fs/fuse/connections/$conn/abort" 2>/dev/null || true
            umount -l "$mp" 2>/dev/null || true
        done
}

OLD_PARAM=""
PROBE_PID=""
bench_workdir transport # B: private (mktemp -d, 0700)
RESULTS=$B/raw.txt
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ -n "$PROBE_PID" ]] && kill -0 "$PROBE_PID" 2>/dev/null; then
        kill -TERM "$PROBE_PID" 2>/dev/null || true # the probe passes it on and unmounts
        wait "$PROBE_PID" 2>/dev/null || true
    fi
    remove_probe_mounts
    if [[ -n "$OLD_PARAM" ]]; then
        echo "$OLD_PARAM" >"$PARAM" || echo "bench-transport.sh: could not restore $PARAM to $OLD_PARAM" >&2
    fi
    if grep -q ferryprobe /proc/mounts; then
        echo "bench-transport.sh: WARNING: a ferryprobe mount is left: $(grep ferryprobe /proc/mounts)" >&2
    fi
    bench_finish "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

uring_missing=""
if [[ -e "$PARAM" ]]; then
    OLD_PARAM=$(cat "$PARAM")
    echo Y >"$PARAM"
else
    uring_missing="$PARAM does not exist: this kernel ($(uname -r)) has no CONFIG_FUSE_IO_URING"
    echo "bench-transport.sh: $uring_missing; running the classic setups only" >&2
    CONFIGS=$(tr ',' '\n' <<<"$CONFIGS" | grep -vx uring | paste -sd, -)
    [[ -n "$CONFIGS" ]] || { echo "bench-transport.sh: no setup left to run" >&2; exit 3; }
fi

log "fuse-transport-probe: reps=$REPS files=$FILES secs=$SECS entries=$ENTRIES configs=$CONFIGS" \
    "enable_uring=$(cat "$PARAM" 2>/dev/null || echo missing) kernel=$(uname -r) cpus=$(nproc)"
mkdir -m 700 "$B/mnt"
# In the background and waited for, so that a signal to this script is acted on at once.
"$PROBE" all --reps "$REPS" --files "$FILES" --secs "$SECS" --entries "$ENTRIES" \
    --configs "$CONFIGS" --mnt "$B/mnt" >"$RESULTS" &
PROBE_PID=$!
rc=0
wait "$PROBE_PID" || rc=$?
PROBE_PID=""

# Anything that went wrong in a run, then the tables.
grep -E '\| (ERROR|UNAVAILABLE|INFO ring_len_mismatch|stderr:)' "$RESULTS" || true
sed -n '/^== RAW RUNS ==$/,$p' "$RESULTS"
if [[ -n "$uring_missing" ]]; then
    echo
    echo "uring: NOT MEASURED: $uring_missing"
    [[ $rc -ne 0 ]] || rc=3
fi
exit "$rc"
