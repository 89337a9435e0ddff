#!/usr/bin/env bash
# The scale benchmark: how the cost of ferryfs grows with the size of a pool. Each table has
# one row per size and a ratio to the row before it, so that the order of growth shows:
# 10x the size and about 10x the time is linear, about 100x is quadratic.
#
#   scripts/bench-scale.sh                   # every table at its full sizes (about 15 min)
#   BENCH_QUICK=1 scripts/bench-scale.sh     # smaller sizes (about 3 min)
#
# Tables:
#   datasets  a pool of N data sets (one 128-byte write each, 1000 per directory, created
#             through the mount; the pool grows from one size to the next): creation time,
#             mount time (command start to serving, page cache dropped), unmount time, the
#             catalog snapshot and bytes per data set, the compaction time (the last one
#             before the mount, at unmount, from mount.log), a read of .ferry/status (the
#             data sets per volume, which the catalog keeps counted), `fsck` (reads and
#             checks the catalog), and the daemon's memory (VmRSS) after the mount, per
#             data set.
#   volumes   a pool of V volumes: mount time, and the time to allocate M small data sets
#             (64 KiB each, written through the mount) spread over them.
#   plans     a merge of a volume holding N one-track data sets into another: the time from
#             the control line to its reply ("ok plan"), i.e. the scheduling, and the time
#             until the plan is done (the copies too).
#   sparse    a data set of L logical bytes holding 64 MiB of data (64 runs of 1 MiB spread
#             evenly) migrated to the other volume: the job's time, and the daemon's peak
#             memory during the job (VmHWM, reset before it) above its memory before it.
#
# Environment (all optional):
#   BENCH_SCALE_TABLES="datasets volumes plans sparse"   the tables to run
#   BENCH_SCALE_DATASETS="10000 100000 1000000"          sizes of the datasets table
#   BENCH_SCALE_VOLUMES="1 10 100 1000"                  sizes of the volumes table
#   BENCH_SCALE_ALLOC=10000       data sets written in each row of the volumes table
#   BENCH_SCALE_PLANS="100 1000 10000"                   sizes of the plans table
#   BENCH_SCALE_SPARSE="1G 100G 1T"                      logical sizes of the sparse table
#   BENCH_SCALE_MOUNTS=3         timed mounts per row (the median is shown)
#   BENCH_DIR=DIR                where the temporary directory goes (default /var/tmp)
#   BENCH_FERRYFS=PATH           measure this ferryfs binary instead of building the checkout's
#
# Needs root (drop_caches, FUSE mounts by root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ -n "${BENCH_QUICK:-}" && "${BENCH_QUICK}" != 0 ]]; then
    : "${BENCH_SCALE_DATASETS:=1000 10000 100000}" "${BENCH_SCALE_VOLUMES:=1 10 100}"
    : "${BENCH_SCALE_PLANS:=100 1000}" "${BENCH_SCALE_SPARSE:=1G 100G}"
fi
TABLES=${BENCH_SCALE_TABLES:-datasets volumes plans sparse}
DATASETS=${BENCH_SCALE_DATASETS:-10000 100000 1000000}
VOLUMES=${BENCH_SCALE_VOLUMES:-1 10 100 1000}
ALLOC=${BENCH_SCALE_ALLOC:-10000}
PLANS=${BENCH_SCALE_PLANS:-100 1000 10000}
SPARSE=${BENCH_SCALE_SPARSE:-1G 100G 1T}
MOUNTS=${BENCH_SCALE_MOUNTS:-3}

if [[ $(id -u) -ne 0 ]]; then
    echo "bench-scale: run as root (drop_caches and FUSE mounts need it)" >&2
    exit 1
fi

if [[ -n "${BENCH_FERRYFS:-}" ]]; then
    FERRY=$BENCH_FERRYFS
else
    cargo build --release --quiet
    FERRY="$ROOT/target/release/ferryfs"
fi

BASE=${BENCH_DIR:-/var/tmp}
mkdir -p "$BASE"
B=$(mktemp -d "$BASE/ferryfs-scale.XXXXXX")
MNT=$B/mnt
RESULTS=$B/results.txt
mkdir -p "$MNT"
: >"$RESULTS"

# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

unmount_all() {
    if mountpoint -q "$MNT" 2>/dev/null; then
        "$FERRY" umount "$MNT" 2>/dev/null || fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null || true
    fi
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_all
    bench_finish "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}
now() { date +%s.%N; }
# The daemon logs each compaction and its time at debug level.
MOUNT_LOG="info,ferryfs::catalog::store=debug"
since() { echo "$(now) - $1" | bc -l; }
daemon_pid() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$1/mounted"; }
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
# The last "catalog compacted" line of the pool's log: its milliseconds.
compact_ms() { grep -h 'catalog compacted' "$1/mount.log" 2>/dev/null | tail -1 | sed -n 's/.* in \([0-9.]*\) ms.*/\1/p'; }

PY=$B/scale.py
cat >"$PY" <<'EOF'
import os, statistics, sys, time

def populate(directory, first, last, size):
    """Data sets first..last-1 (1000 per directory), one write of `size` bytes each; two
    writers in parallel, each on its own directories."""
    first, last, size = int(first), int(last), int(size)
    data = b"x" * size
    def work(lo, hi):
        for i in range(lo, hi):
            d = os.path.join(directory, f"d{i // 1000:04d}")
            if i % 1000 == 0 or i == lo:
                os.makedirs(d, exist_ok=True)
            fd = os.open(os.path.join(d, f"f{i:07d}"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
    t = time.perf_counter()
    # Split on directory boundaries.
    mid = first + ((last - first) // 2000) * 1000 if last - first >= 2000 else last
    pid = os.fork() if mid < last else 0
    if pid == 0 and mid < last:
        work(mid, last)
        os._exit(0)
    work(first, mid)
    if pid:
        _, st = os.waitpid(pid, 0)
        if st != 0:
            sys.exit("populate: the second writer failed")
    print(f"{time.perf_counter() - t:.3f}")

def sparse(path, logical, data_bytes):
    """A data set of `logical` bytes holding `data_bytes` of data in 64 runs spread evenly."""
    logical, data_bytes = int(logical), int(data_bytes)
    runs = 64
    run = data_bytes // runs
    step = logical // runs
    block = os.urandom(run)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.ftruncate(fd, logical)
    for k in range(runs):
        os.pwrite(fd, block, k * step)
    os.fsync(fd)
    os.close(fd)

def median(*xs):
    print(f"{statistics.median(float(x) for x in xs):.3f}")

def table(path, name):
    """Print the rows of table `name` (lines "name|size|col=val|..."), with the ratio of each
    timed column to the row before."""
    rows = [l.rstrip("\n").split("|") for l in open(path) if l.startswith(name + "|")]
    if not rows:
        return
    cols = [kv.split("=", 1)[0] for kv in rows[0][2:]]
    ratio_cols = [c for c in cols if c.endswith("_s") or c.endswith("_mib") or c.endswith("_bytes")]
    head = ["size"] + [c for c in cols for _ in ((0,) if c not in ratio_cols else (0, 1))]
    labels = ["size"]
    for c in cols:
        labels.append(c)
        if c in ratio_cols:
            labels.append("x prev")
    print(f"\n{name}:\n")
    print("| " + " | ".join(labels) + " |")
    print("|" + "|".join("---:" for _ in labels) + "|")
    prev = None
    for r in rows:
        vals = dict(kv.split("=", 1) for kv in r[2:])
        out = [r[1]]
        for c in cols:
            out.append(vals[c])
            if c in ratio_cols:
                try:
                    out.append(f"{float(vals[c]) / float(prev[c]):.2f}" if prev else "-")
                except (ValueError, ZeroDivisionError):
                    out.append("-")
        print("| " + " | ".join(out) + " |")
        prev = vals

if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
EOF

row() { echo "$*" >>"$RESULTS"; log "$*"; }

# Mount POOL at MNT from a cold cache; print the seconds from the command's start until it
# returns (it returns once the mount serves).
timed_mount() {
    drop_caches
    local t0
    t0=$(now)
    RUST_LOG=$MOUNT_LOG "$FERRY" mount "$1" "$MNT" >/dev/null
    since "$t0"
}
timed_umount() {
    local t0
    t0=$(now)
    "$FERRY" umount "$MNT" >/dev/null
    since "$t0"
}

# ---------------------------------------------------------------------------------------
table_datasets() {
    local pool=$B/ds-pool have=0 n max=0
    for n in $DATASETS; do ((n > max)) && max=$n; done
    "$FERRY" init "$pool" >/dev/null
    # One volume, sparse, that holds every data set (one track each) with room to spare.
    "$FERRY" volume add "$pool" VOL001 --size "$((max * 65536 * 5 / 4 + (1 << 30)))" >/dev/null
    for n in $DATASETS; do
        RUST_LOG=$MOUNT_LOG "$FERRY" mount "$pool" "$MNT" >/dev/null
        local create_s
        create_s=$(python3 "$PY" populate "$MNT" "$have" "$n" 128)
        local first_umount_s
        first_umount_s=$(timed_umount)
        local mounts=() umounts=() rss_kib=0 compact="" status_s=0
        for ((i = 1; i <= MOUNTS; i++)); do
            mounts+=("$(timed_mount "$pool")")
            [[ -e "$MNT/d0000/f0000000" ]] || { echo "bench-scale: the pool lost its data sets" >&2; exit 1; }
            compact=$(compact_ms "$pool")
            local t1
            t1=$(now)
            cat "$MNT/.ferry/status" >/dev/null
            status_s=$(since "$t1")
            local pid
            pid=$(daemon_pid "$pool")
            rss_kib=$(status_kib "$pid" VmRSS)
            umounts+=("$(timed_umount)")
        done
        local snap_bytes
        snap_bytes=$(stat -c %s "$pool/catalog.snap")
        local t0 fsck_s
        t0=$(now)
        "$FERRY" fsck "$pool" >/dev/null
        fsck_s=$(since "$t0")
        row "datasets|$n|create_s=$(printf %.1f "$create_s")|create_per_ds_us=$(echo "$create_s * 1000000 / ($n - $have)" | bc)|mount_s=$(python3 "$PY" median "${mounts[@]}")|umount_s=$(python3 "$PY" median "${umounts[@]}")|first_umount_s=$(printf %.3f "$first_umount_s")|compact_s=$(printf %.3f "$(echo "${compact:-0} / 1000" | bc -l)")|status_s=$(printf %.3f "$status_s")|fsck_s=$(printf %.3f "$fsck_s")|snap_bytes=$snap_bytes|snap_per_ds=$((snap_bytes / n))|rss_mib=$((rss_kib / 1024))|rss_per_ds=$((rss_kib * 1024 / n))"
        have=$n
    done
    rm -rf --one-file-system "$pool"
}

# ---------------------------------------------------------------------------------------
table_volumes() {
    local v
    for v in $VOLUMES; do
        local pool=$B/vol-pool
        "$FERRY" init "$pool" >/dev/null
        # Every volume holds the whole allocation, so the allocator has a real choice.
        local size=$(((ALLOC * 65536 * 2) + (64 << 20)))
        local t0 add_s
        t0=$(now)
        for ((i = 1; i <= v; i++)); do
            "$FERRY" volume add "$pool" "$(printf 'V%04d' "$i")" --size "$size" >/dev/null
        done
        add_s=$(since "$t0")
        local mounts=() i
        for ((i = 1; i <= MOUNTS; i++)); do
            mounts+=("$(timed_mount "$pool")")
            "$FERRY" umount "$MNT" >/dev/null
        done
        "$FERRY" mount "$pool" "$MNT" >/dev/null
        local alloc_s
        alloc_s=$(python3 "$PY" populate "$MNT" 0 "$ALLOC" 65536)
        local used
        used=$("$FERRY" volume list "$MNT" --json | python3 -c 'import json,sys; print(sum(1 for v in json.load(sys.stdin)["volumes"] if v["tracks_used"] > 0))')
        local umount_s
        umount_s=$(timed_umount)
        row "volumes|$v|add_s=$(printf %.2f "$add_s")|mount_s=$(python3 "$PY" median "${mounts[@]}")|alloc_s=$(printf %.3f "$alloc_s")|alloc_per_ds_us=$(echo "$alloc_s * 1000000 / $ALLOC" | bc)|volumes_used=$used|umount_s=$(printf %.3f "$umount_s")"
        rm -rf --one-file-system "$pool"
    done
}

# ---------------------------------------------------------------------------------------
table_plans() {
    local n
    for n in $PLANS; do
        local pool=$B/plan-pool
        "$FERRY" init "$pool" >/dev/null
        local size=$((n * 65536 * 2 + (64 << 20)))
        "$FERRY" volume add "$pool" V1 --size "$size" >/dev/null
        "$FERRY" mount "$pool" "$MNT" >/dev/null
        python3 "$PY" populate "$MNT" 0 "$n" 4096 >/dev/null
        # The target is added after the data sets, so that they all sit on V1.
        "$FERRY" volume add "$MNT" V2 --size "$size" >/dev/null
        sync
        local t0 reply sched_s done_s plan
        t0=$(now)
        exec 3<>"$MNT/.ferry/control"
        echo "merge V1 into V2" >&3
        read -r reply <&3
        sched_s=$(since "$t0")
        exec 3>&-
        [[ $reply == "ok plan"* ]] || { echo "bench-scale: merge refused: $reply" >&2; exit 1; }
        plan=$(echo "$reply" | awk '{print $3}')
        "$FERRY" wait "$MNT" "$plan" --interval 600 >/dev/null
        done_s=$(since "$t0")
        local umount_s
        umount_s=$(timed_umount)
        row "plans|$n|schedule_s=$(printf %.3f "$sched_s")|schedule_per_job_us=$(echo "$sched_s * 1000000 / $n" | bc)|done_s=$(printf %.2f "$done_s")|umount_s=$(printf %.3f "$umount_s")"
        rm -rf --one-file-system "$pool"
    done
}

# ---------------------------------------------------------------------------------------
table_sparse() {
    local pool=$B/sparse-pool
    "$FERRY" init "$pool" >/dev/null
    "$FERRY" volume add "$pool" V1 --size 1G >/dev/null
    "$FERRY" volume add "$pool" V2 --size 1G >/dev/null
    local l
    for l in $SPARSE; do
        "$FERRY" mount "$pool" "$MNT" >/dev/null
        local bytes
        bytes=$(numfmt --from=iec "$l")
        python3 "$PY" sparse "$MNT/s$l" "$bytes" $((64 << 20))
        local on
        on=$("$FERRY" ls "$MNT" "/s$l" --json | python3 -c 'import json,sys; print(",".join(json.load(sys.stdin)["data_sets"][0]["volumes"]))')
        local to=V2
        [[ $on == *V2* ]] && to=V1
        local pid base_kib peak_kib t0 job_s
        pid=$(daemon_pid "$pool")
        sync
        echo 5 >"/proc/$pid/clear_refs" # the peak (VmHWM) starts again from the RSS now
        base_kib=$(status_kib "$pid" VmRSS)
        t0=$(now)
        "$FERRY" migrate "$MNT" "/s$l" --to "$to" --wait >/dev/null
        job_s=$(since "$t0")
        peak_kib=$(status_kib "$pid" VmHWM)
        local tracks=$((bytes / 65536))
        row "sparse|$l|job_s=$(printf %.2f "$job_s")|rss_before_mib=$((base_kib / 1024))|peak_mib=$((peak_kib / 1024))|peak_growth_kib=$((peak_kib - base_kib))|bitmap_kib=$((tracks / 8 / 1024))"
        "$FERRY" umount "$MNT" >/dev/null
    done
    rm -rf --one-file-system "$pool"
}

log "ferryfs scale benchmark in $B ($(df -T "$B" | awk 'NR==2 {print $2}')), tables: $TABLES"
for t in $TABLES; do
    "table_$t"
done

echo
echo "ferryfs scale benchmark, ferryfs $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), backing file system $(df -T "$B" | awk 'NR==2 {print $2}') ($BASE)"
for t in $TABLES; do
    python3 "$PY" table "$RESULTS" "$t"
done
echo
echo "x prev: the column divided by the row before it (10x the size and 10x the time is linear)."
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB memory, load average $(cut -d' ' -f1-3 /proc/loadavg)"
