#!/usr/bin/env bash
# The benchmark: ferryfs against the same file system used natively and through bindfs.
#
# Every number is a ratio against baselines measured in the same run, on the same backing
# file system: a plain directory (native), a bindfs mount of a directory (the FUSE peer),
# and a ferryfs mount whose pool and volume images live in that same file system.
#
#   scripts/bench.sh                 # full run: 1 GiB files, 10 s per fio job, 3 repeats
#   BENCH_QUICK=1 scripts/bench.sh   # quick run: 256 MiB files, 5 s per job, 2 repeats
#
# Environment (all optional):
#   BENCH_SIZE=1G        file size of the fio jobs (a fio size: 256M, 1G, ...)
#   BENCH_RUNTIME=10     seconds of each time-based fio job (after the ramp)
#   BENCH_RAMP=2         seconds of ramp (warm-up, not counted) of each time-based job
#   BENCH_REPEAT=3       repeats of every line; the table shows the median
#   BENCH_META_FILES=10000     files of the metadata test
#   BENCH_MOUNT_FILES=100000   data sets of the mount-time test
#   BENCH_MOUNT_REPEAT=5       timed mounts of that pool
#   BENCH_THREADS=N      pass --threads N to ferryfs mount (default: ferryfs's own default)
#   BENCH_MOUNT_OPTS=LIST   pass -o LIST to ferryfs mount (e.g. writeback)
#   BENCH_DIR=DIR        where to build the temporary directories (default: under /var/tmp);
#                        this directory's file system is the one measured
#   BENCH_KEEP_RESULTS=FILE    also write the raw results (one JSON object per run) to FILE
#   BENCH_WARM_MIB=N     memory touched and freed before each timed job (default: twice the
#                        file size + 512 MiB; 0: none; bench_warm_memory in lib/bench-common.sh)
#   BENCH_FERRYFS=PATH   measure this ferryfs binary instead of building the checkout's
#
# Needs root (to drop the page cache before the cold read, and for FUSE mounts by root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ -n "${BENCH_QUICK:-}" && "${BENCH_QUICK}" != 0 ]]; then
    : "${BENCH_SIZE:=256M}" "${BENCH_RUNTIME:=5}" "${BENCH_RAMP:=1}" "${BENCH_REPEAT:=2}"
fi
SIZE=${BENCH_SIZE:-1G}
RUNTIME=${BENCH_RUNTIME:-10}
RAMP=${BENCH_RAMP:-2}
REPEAT=${BENCH_REPEAT:-3}
META_FILES=${BENCH_META_FILES:-10000}
MOUNT_FILES=${BENCH_MOUNT_FILES:-100000}
MOUNT_REPEAT=${BENCH_MOUNT_REPEAT:-5}

if [[ $(id -u) -ne 0 ]]; then
    echo "bench: run as root (drop_caches and FUSE mounts need it)" >&2
    exit 1
fi

scripts/deps.sh --bench
if [[ -n "${BENCH_FERRYFS:-}" ]]; then
    FERRY=$BENCH_FERRYFS # another build of ferryfs, to compare two in the same conditions
else
    cargo build --release --quiet
    FERRY="$ROOT/target/release/ferryfs"
fi

SIZE_BYTES=$(numfmt --from=iec "${SIZE%B}")
# The volume holds the fio file with room to spare (images are sparse).
VOL_BYTES=$((SIZE_BYTES * 2 + (1 << 30)))
THREAD_ARGS=()
[[ -n "${BENCH_THREADS:-}" ]] && THREAD_ARGS=(--threads "$BENCH_THREADS")
[[ -n "${BENCH_MOUNT_OPTS:-}" ]] && THREAD_ARGS+=(-o "$BENCH_MOUNT_OPTS")

BASE=${BENCH_DIR:-/var/tmp}
mkdir -p "$BASE"
B=$(mktemp -d "$BASE/ferryfs-bench.XXXXXX")
NATIVE=$B/native
BSRC=$B/bindfs-src
BMNT=$B/bindfs-mnt
POOL=$B/pool
FMNT=$B/ferryfs-mnt
MPOOL=$B/mount-pool
MMNT=$B/mount-mnt
RESULTS=$B/results.jsonl
mkdir -p "$NATIVE" "$BSRC" "$BMNT" "$FMNT" "$MMNT"

unmount_all() {
    for m in "$FMNT" "$MMNT"; do
        if mountpoint -q "$m" 2>/dev/null; then
            "$FERRY" umount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
        fi
    done
    if mountpoint -q "$BMNT" 2>/dev/null; then
        fusermount3 -u "$BMNT" 2>/dev/null || fusermount3 -uz "$BMNT" 2>/dev/null || true
    fi
}
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_all
    bench_finish "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# ---------------------------------------------------------------------------------------
# Helpers in python3: fio JSON parsing, the metadata test, the data set creation, and the
# report.
PY=$B/bench.py
cat >"$PY" <<'EOF'
import json, os, statistics, sys, time

def fio_result(path, kind):
    """Print the MiB/s or IOPS of a fio JSON output (group_reporting: one job entry)."""
    with open(path) as f:
        text = f.read()
    # fio may print warnings before the JSON document.
    d = json.loads(text[text.index("{"):])
    jobs = d["jobs"]
    side = "write" if "write" in kind else "read"
    bw_kib = sum(j[side]["bw"] for j in jobs)
    iops = sum(j[side]["iops"] for j in jobs)
    print(f"{bw_kib / 1024:.1f} {iops:.0f}")

def meta(directory, n):
    """Create, stat and unlink n files; print the ops/s of each phase."""
    n = int(n)
    names = [os.path.join(directory, f"f{i:06d}") for i in range(n)]
    out = []
    t = time.perf_counter()
    for p in names:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    out.append(n / (time.perf_counter() - t))
    t = time.perf_counter()
    for p in names:
        os.stat(p)
    out.append(n / (time.perf_counter() - t))
    t = time.perf_counter()
    for p in names:
        os.unlink(p)
    out.append(n / (time.perf_counter() - t))
    print(" ".join(f"{x:.0f}" for x in out))

def populate(directory, n):
    """n small data sets (one 128-byte write each), 1000 per directory."""
    n = int(n)
    data = b"x" * 128
    t = time.perf_counter()
    for i in range(n):
        d = os.path.join(directory, f"d{i // 1000:04d}")
        if i % 1000 == 0:
            os.mkdir(d)
        fd = os.open(os.path.join(d, f"f{i:06d}"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    print(f"{time.perf_counter() - t:.1f}")

def median(xs):
    return statistics.median(xs)

def report(results_path, meta_json):
    rows = {}
    order = []
    with open(results_path) as f:
        for line in f:
            r = json.loads(line)
            key = r["line"]
            if key not in rows:
                rows[key] = {"unit": r["unit"], "target": r["target"], "runs": {}}
                order.append(key)
            rows[key]["runs"].setdefault(r["config"], []).append(r["value"])
    m = json.loads(meta_json)
    print()
    print(f"ferryfs benchmark: {m['size']} files, {m['runtime']} s jobs ({m['ramp']} s ramp), "
          f"median of {m['repeat']}, backing file system {m['fstype']} ({m['dir']})")
    print()
    hdr = f"| {'line':<34} | {'unit':<5} | {'native':>9} | {'bindfs':>9} | {'ferryfs':>9} | {'f/native':>8} | {'f/bindfs':>8} | {'target':>9} | {'meets':<5} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    misses = 0
    for key in order:
        r = rows[key]
        n = median(r["runs"]["native"])
        b = median(r["runs"]["bindfs"])
        f = median(r["runs"]["ferryfs"])
        # Every line: at least 2x bindfs or 0.9x native, whichever is lower; some lines
        # also carry a floor against native.
        need = min(2 * b, 0.9 * n)
        floor = r["target"]
        need = max(need, floor * n)
        ok = f >= need
        n = n or float("nan")
        b = b or float("nan")
        misses += not ok
        fmt = (lambda x: f"{x:9.0f}") if r["unit"] == "IOPS" or r["unit"] == "ops/s" else (lambda x: f"{x:9.1f}")
        print(f"| {key:<34} | {r['unit']:<5} | {fmt(n)} | {fmt(b)} | {fmt(f)} | {f / n:8.2f} | {f / b:8.2f} | "
              f"{need / n:8.2f}n | {'yes' if ok else 'NO':<5} |")
    print()
    print("target: ferryfs >= min(2 x bindfs, 0.9 x native), and >= 0.7 x native on sequential write and cold")
    print("sequential read, >= 0.9 x native on warm random read; the target column is that bound as a")
    print("fraction of native.")
    print(f"lines missing their target: {misses} of {len(order)}")
    print()
    print("all runs (config: values in run order):")
    for key in order:
        runs = rows[key]["runs"]
        print(f"  {key}: " + "; ".join(f"{c} " + " ".join(f"{v:g}" for v in runs[c]) for c in ("native", "bindfs", "ferryfs")))

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "fio":
        fio_result(sys.argv[2], sys.argv[3])
    elif cmd == "meta":
        meta(sys.argv[2], sys.argv[3])
    elif cmd == "populate":
        populate(sys.argv[2], sys.argv[3])
    elif cmd == "median":
        print(f"{median([float(x) for x in sys.argv[2:]]):.3f}")
    elif cmd == "report":
        report(sys.argv[2], sys.argv[3])
EOF

# ---------------------------------------------------------------------------------------
# The three configurations.
log "bench dir $B ($(df -T "$B" | awk 'NR==2{print $2" on "$1}'))"
bindfs "$BSRC" "$BMNT"
"$FERRY" init "$POOL" >/dev/null
"$FERRY" volume add "$POOL" VOL001 --size "$VOL_BYTES" >/dev/null
"$FERRY" mount "$POOL" "$FMNT" "${THREAD_ARGS[@]}" >/dev/null
CONFIGS=(native bindfs ferryfs)
declare -A DIR=([native]=$NATIVE [bindfs]=$BMNT [ferryfs]=$FMNT)

record() { # line unit target config value
    printf '{"line":"%s","unit":"%s","target":%s,"config":"%s","value":%s}\n' "$1" "$2" "$3" "$4" "$5" >>"$RESULTS"
}

# Before each timed job: memory for twice the file and some touched and freed, so that no
# configuration pays the host's faults of memory that rested (bench_warm_memory in
# scripts/lib/bench-common.sh; docs/benchmarks.md, "Machine").
settle() {
    # Let the previous job's dirty pages reach the disk before the next timed job.
    sync
    bench_warm_memory "$SIZE_BYTES"
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    bench_warm_memory "$SIZE_BYTES"
}

# fio DIR NAME RW BS extra-args...  -> prints "MiB/s IOPS"
run_fio() {
    local dir=$1 name=$2 rw=$3 bs=$4
    shift 4
    local out=$B/fio-$name.json
    # shellcheck disable=SC2086
    fio --name="$name" --directory="$dir" ${FIO_FILES:---filename=bench.dat} --ioengine=psync --rw="$rw" --bs="$bs" \
        --size="$SIZE" --fallocate=none --invalidate="${INVALIDATE:-0}" --group_reporting --output-format=json --output="$out" "$@" >/dev/null
    python3 "$PY" fio "$out" "$rw"
}

timed=(--time_based --runtime="$RUNTIME" --ramp_time="$RAMP")

# Warm-up: page in fio, the daemons and the CPU frequency before anything is timed.
log "warm-up"
for c in "${CONFIGS[@]}"; do
    run_fio "${DIR[$c]}" warmup write 1M --size=64M >/dev/null
    rm -f "${DIR[$c]}/bench.dat"
done

# One line: LINE UNIT TARGET FIELD(1=MiB/s 2=IOPS) then a function that runs it for a config.
line() {
    local label=$1 unit=$2 target=$3 field=$4 fn=$5
    local rep c v
    for ((rep = 1; rep <= REPEAT; rep++)); do
        for c in "${CONFIGS[@]}"; do
            v=$($fn "$c" | awk -v f="$field" '{print $f}')
            record "$label" "$unit" "$target" "$c" "$v"
            log "$label [$c #$rep]: $v $unit"
        done
    done
}

seq_write() {
    # Write the file once, durably: the time includes the final fsync. (A time-based job
    # would rewrite the same pages in the native page cache at memory speed.)
    local d=${DIR[$1]}
    rm -f "$d/bench.dat"
    settle
    run_fio "$d" seqwrite write 1M --end_fsync=1
}
seq_write_wronly() {
    # The same stream from a write-only handle (what cp, dd, tar and rsync open).
    local d=${DIR[$1]}
    rm -f "$d/bench.dat"
    settle
    local t0 t1
    t0=$(date +%s.%N)
    dd if=/dev/zero of="$d/bench.dat" bs=1M count=$((SIZE_BYTES >> 20)) conv=fsync status=none
    t1=$(date +%s.%N)
    python3 -c "import sys; mib=$SIZE_BYTES/1048576; print(f'{mib/($t1-$t0):.1f} 0')"
}
# Each config needs the file in place for the read lines; lay it out once, untimed.
layout() {
    for c in "${CONFIGS[@]}"; do
        rm -f "${DIR[$c]}/bench.dat"
        run_fio "${DIR[$c]}" layout write 1M --end_fsync=1 >/dev/null
    done
}
cold_read() {
    # Read the file once from a cold cache (time-based would wrap around into warm reads).
    drop_caches
    INVALIDATE=1 run_fio "${DIR[$1]}" coldread read 1M
}
warm_randread() {
    local d=${DIR[$1]}
    run_fio "$d" warm read 1M >/dev/null # warm the cache with one full read
    run_fio "$d" randread randread 4k "${timed[@]}"
}
rand_write1() {
    settle
    run_fio "${DIR[$1]}" randwrite1 randwrite 4k "${timed[@]}" --iodepth=1 --numjobs=1
}
rand_write4() {
    settle
    # Four jobs, each on its own file of a quarter of the size (fio's default for numjobs).
    local q=$((SIZE_BYTES / 4))
    rm -f "${DIR[$1]}"/bench.[0-3]
    FIO_FILES='--filename_format=bench.$jobnum' run_fio "${DIR[$1]}" randwrite4 randwrite 4k "${timed[@]}" \
        --iodepth=1 --numjobs=4 --size="$q"
}

append_sync() {
    # A log appender that syncs every record: each write grows the file, so each fdatasync
    # must make the new size durable too (ferryfs: the image and the catalog's log).
    local d=${DIR[$1]}
    rm -f "$d/bench.dat"
    settle
    run_fio "$d" appendsync write 4k "${timed[@]}" --fdatasync=1
}
churn() {
    # Files that come and go, each synced: every write takes the tracks the last unlink
    # freed (ferryfs: those are quarantined until the log holds the unlink durably).
    local d=${DIR[$1]}/churn
    mkdir -p "$d"
    settle
    python3 - "$d" "$RUNTIME" <<'CHURN'
import os, sys, time
d, secs = sys.argv[1], float(sys.argv[2])
buf = os.urandom(65536)
n, t0 = 0, time.monotonic()
while time.monotonic() - t0 < secs:
    p = os.path.join(d, f"f{n % 8}")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    os.unlink(p)
    n += 1
print(f"0 {n / (time.monotonic() - t0):.1f}")
CHURN
    rm -rf "$d"
}

log "sequential write 1 MiB"
line "seq write 1MiB (end_fsync)" "MiB/s" 0.7 1 seq_write
log "sequential write 1 MiB, write-only handle"
line "seq write 1MiB write-only (dd)" "MiB/s" 0.7 1 seq_write_wronly
layout
log "cold sequential read 1 MiB"
line "cold seq read 1MiB" "MiB/s" 0.7 1 cold_read
log "warm random read 4 KiB"
line "warm rand read 4KiB" "IOPS" 0.9 2 warm_randread
log "random write 4 KiB, 1 job"
line "rand write 4KiB qd1 1 job" "IOPS" 0 2 rand_write1
log "random write 4 KiB, 4 jobs"
line "rand write 4KiB qd1 4 jobs" "IOPS" 0 2 rand_write4
log "append 4 KiB, fdatasync after each"
line "append 4KiB + fdatasync" "IOPS" 0 2 append_sync
log "churn: create, write 64 KiB, fsync, unlink"
line "churn create+64KiB+fsync+unlink" "ops/s" 0 2 churn
for c in "${CONFIGS[@]}"; do rm -f "${DIR[$c]}/bench.dat" "${DIR[$c]}"/bench.[0-3]; done
settle

# Metadata: create, stat, unlink META_FILES files, each phase timed.
META_OUT=$B/meta.txt
meta_run() {
    local d=${DIR[$1]}/meta
    mkdir "$d"
    python3 "$PY" meta "$d" "$META_FILES"
    rmdir "$d"
}
log "metadata: $META_FILES files"
for ((rep = 1; rep <= REPEAT; rep++)); do
    for c in "${CONFIGS[@]}"; do
        settle
        read -r cr st un < <(meta_run "$c")
        record "create $META_FILES files" "ops/s" 0 "$c" "$cr"
        record "stat $META_FILES files" "ops/s" 0 "$c" "$st"
        record "unlink $META_FILES files" "ops/s" 0 "$c" "$un"
        log "metadata [$c #$rep]: create $cr stat $st unlink $un ops/s"
    done
done

# Mount time of a pool holding MOUNT_FILES data sets.
log "mount time: creating $MOUNT_FILES data sets"
"$FERRY" init "$MPOOL" >/dev/null
# One 64 KiB track each at the default track size.
"$FERRY" volume add "$MPOOL" VOL001 --size "$(((MOUNT_FILES * 65536 * 5 / 4) + (1 << 30)))" >/dev/null
"$FERRY" mount "$MPOOL" "$MMNT" "${THREAD_ARGS[@]}" >/dev/null
populate_s=$(python3 "$PY" populate "$MMNT" "$MOUNT_FILES")
log "created $MOUNT_FILES data sets in $populate_s s"
t0=$EPOCHREALTIME
"$FERRY" umount "$MMNT"
t1=$EPOCHREALTIME
first_umount_s=$(echo "$t1 - $t0" | bc -l)
mount_times=()
umount_times=()
for ((i = 1; i <= MOUNT_REPEAT; i++)); do
    drop_caches
    t0=$EPOCHREALTIME
    "$FERRY" mount "$MPOOL" "$MMNT" "${THREAD_ARGS[@]}" >/dev/null
    t1=$EPOCHREALTIME
    # Check that it serves.
    [[ -e "$MMNT/d0000/f000000" ]] || { echo "bench: the mounted pool lost its data sets" >&2; exit 1; }
    "$FERRY" umount "$MMNT"
    t2=$EPOCHREALTIME
    mount_times+=("$(echo "$t1 - $t0" | bc -l)")
    umount_times+=("$(echo "$t2 - $t1" | bc -l)")
    log "mount #$i: $(printf %.3f "${mount_times[-1]}") s (umount $(printf %.3f "${umount_times[-1]}") s)"
done
snap_bytes=$(stat -c %s "$MPOOL/catalog.snap")

# ---------------------------------------------------------------------------------------
fstype=$(df -T "$B" | awk 'NR==2{print $2}')
meta_json=$(printf '{"size":"%s","runtime":%s,"ramp":%s,"repeat":%s,"fstype":"%s","dir":"%s"}' \
    "$SIZE" "$RUNTIME" "$RAMP" "$REPEAT" "$fstype" "$BASE")
python3 "$PY" report "$RESULTS" "$meta_json"
echo
printf 'mount of a pool with %s data sets (catalog.snap %s bytes), cold cache, %s mounts:\n' \
    "$MOUNT_FILES" "$snap_bytes" "$MOUNT_REPEAT"
printf '  median %s s (runs: %s)\n' "$(python3 "$PY" median "${mount_times[@]}")" \
    "$(printf '%.3f ' "${mount_times[@]}")"
printf '  umount median %s s; creating the data sets took %s s, the first umount %.3f s\n' \
    "$(python3 "$PY" median "${umount_times[@]}")" "$populate_s" "$first_umount_s"
echo "machine: $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB memory, load average $(cut -d' ' -f1-3 /proc/loadavg)"
