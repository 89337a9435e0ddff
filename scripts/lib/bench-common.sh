# Shared by the benchmarks (sourced): the end of their cleanup trap, their log line, and the
# set-up of the side-by-side scripts (the default build, the work directory, a fresh pool).

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

# Unmount the ferryfs mount MNT (of the build FERRY) if one is there: the start of a cleanup
# trap of a script that uses bench_on_fresh_pool.
bench_umount_pool() {
    if [[ -n "${MNT:-}" ]] && mountpoint -q "$MNT"; then
        "$FERRY" umount "$MNT" >/dev/null 2>&1 || umount -l "$MNT" || true
    fi
}

# Run FN DIR on a fresh pool of the ferryfs build BIN (one volume V1 of VOL_SIZE) mounted at
# $B/mnt with MOUNT_ARGS, then unmount and remove it; what FN printed is left in BENCH_OUT.
# MNT and FERRY say what is mounted, for the caller's cleanup trap (bench_umount_pool; so
# call it in the script's own shell, not in a command substitution).
bench_on_fresh_pool() { # BIN VOL_SIZE FN [MOUNT_ARGS...]
    local bin=$1 size=$2 fn=$3
    shift 3
    FERRY=$bin
    "$bin" init "$B/pool" >/dev/null
    "$bin" volume add "$B/pool" V1 --size "$size" >/dev/null
    mkdir -p "$B/mnt"
    "$bin" mount "$@" "$B/pool" "$B/mnt" >/dev/null
    MNT=$B/mnt
    BENCH_OUT=$("$fn" "$B/mnt")
    "$bin" umount "$B/mnt" >/dev/null
    MNT=""
    rm -rf "$B/pool" "$B/mnt"
}

# Touch twice DATA_BYTES + 512 MiB of memory and give it back, just before a timed run of
# DATA_BYTES (BENCH_WARM_MIB sets the MiB instead; 0 turns it off). On a virtual machine
# whose balloon reports free pages to its host, memory that stays free for a few seconds goes
# back to the host, and the first touch of each such page costs a fault in the host. Measured
# on the machine of docs/benchmarks.md: `cp` + `sync` of 1 GiB took 2.2-3.3 s after 5 s of
# rest, against 0.9-1.2 s right after 3 GiB were touched and freed; the touch itself took
# 5-9 s. The pages touched here are free, and still backed, when the run starts, so every
# side of a comparison starts from the same memory.
bench_warm_memory() { # DATA_BYTES
    local mib=${BENCH_WARM_MIB:-$(((2 * $1 >> 20) + 512))}
    ((mib > 0)) || return 0
    python3 -c 'import sys; bytearray(int(sys.argv[1]) << 20)' "$mib"
}

# A / B, two decimals.
bench_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# The checkout's release build, built first: what the side-by-side scripts measure when
# given no builds. Prints its path.
bench_checkout_build() {
    cargo build --release --locked --quiet
    echo "$(pwd)/target/release/ferryfs"
}

# A fresh work directory for the script NAME under BENCH_DIR (default /var/tmp), in B; and
# nothing mounted yet (MNT, FERRY) for bench_umount_pool.
bench_workdir() { # NAME
    B=$(mktemp -d "${BENCH_DIR:-/var/tmp}/ferryfs-bench-$1.XXXXXX")
    MNT=""
    FERRY=""
}
