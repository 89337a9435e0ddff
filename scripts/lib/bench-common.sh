# Shared by the benchmarks (sourced): the end of their cleanup trap, and their log line.

# Keep the raw results if asked (BENCH_KEEP_RESULTS), remove the temporary directory $B, and
# exit with RC.
bench_finish() { # RC
    if [[ -n "${BENCH_KEEP_RESULTS:-}" && -f "$RESULTS" ]]; then
        cp "$RESULTS" "$BENCH_KEEP_RESULTS" || true
    fi
    # --one-file-system: never descend into a mount that refused to go away.
    rm -rf --one-file-system "$B" 2>/dev/null || true
    exit "$1"
}

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

# Run FN DIR on a fresh pool of the ferryfs build BIN (one volume V1 of VOL_SIZE) mounted at
# $B/mnt, then unmount and remove it; what FN printed is left in BENCH_OUT. MNT and FERRY say
# what is mounted, for the caller's cleanup trap (so call it in the script's own shell, not
# in a command substitution).
bench_on_fresh_pool() { # BIN VOL_SIZE FN
    local bin=$1
    FERRY=$bin
    "$bin" init "$B/pool" >/dev/null
    "$bin" volume add "$B/pool" V1 --size "$2" >/dev/null
    mkdir -p "$B/mnt"
    "$bin" mount "$B/pool" "$B/mnt" >/dev/null
    MNT=$B/mnt
    BENCH_OUT=$("$3" "$B/mnt")
    "$bin" umount "$B/mnt" >/dev/null
    MNT=""
    rm -rf "$B/pool" "$B/mnt"
}

# A / B, two decimals.
bench_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
