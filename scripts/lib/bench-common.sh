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
