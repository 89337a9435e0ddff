#!/usr/bin/env bash
# Thread counts (and builds) side by side, on the lines the FUSE threads decide: unlinks,
# 4 KiB random writes from 4 jobs and from 1, appenders that fdatasync every 4 KiB (three at
# once, then one) and the churn loop of bench.sh. Each configuration runs on a fresh pool and
# mount, and the configurations are interleaved round by round.
#
#   scripts/bench-threads.sh                                   # the checkout's build at 1, 2, 3 threads
#   BENCH_THREADS_CONFIGS="/tmp/old:3 /tmp/new:2" scripts/bench-threads.sh
#
# Environment (all optional):
#   BENCH_THREADS_CONFIGS="BIN:N ..."   builds and their --threads (default: the checkout's at 1 2 3)
#   BENCH_THREADS_ROUNDS=3              rounds
#   BENCH_THREADS_SECS=4                seconds of each fio job and of the churn loop
#   BENCH_DIR=DIR                       where the temporary directories go (default: under /var/tmp)
#
# Needs root (FUSE mounts by root) and fio (scripts/deps.sh --bench installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh
ROUNDS=${BENCH_THREADS_ROUNDS:-3}
SECS=${BENCH_THREADS_SECS:-4}
if [[ -z "${BENCH_THREADS_CONFIGS:-}" ]]; then
    bin=$(bench_checkout_build)
    BENCH_THREADS_CONFIGS="$bin:1 $bin:2 $bin:3"
fi
read -r -a CONFIGS <<<"$BENCH_THREADS_CONFIGS"
command -v fio >/dev/null || scripts/deps.sh --bench >/dev/null
bench_workdir threads
cleanup() {
    bench_umount_pool
    rm -rf --one-file-system "$B"
}
trap cleanup EXIT INT TERM

# fio_iops DIR NAME ARGS... -> the jobs' summed write IOPS
fio_iops() {
    local dir=$1 name=$2
    shift 2
    sync
    fio --name="$name" --directory="$dir" --ioengine=psync --bs=4k --fallocate=none --invalidate=0 \
        --time_based --runtime="$SECS" --ramp_time=1 --group_reporting --output-format=json \
        --output="$B/fio.json" "$@" >/dev/null
    rm -f "$dir/$name".*
    python3 -c "import json; print('%.0f' % sum(j['write']['iops'] for j in json.load(open('$B/fio.json'))['jobs']))"
}

# lines MNT -> "unlink rw4 rw1 ap3 ap1 churn"
lines() {
    local m=$1 un rw4 rw1 ap3 ap1 ch
    un=$(python3 - "$m" <<'PY'
import os, sys, time
d = os.path.join(sys.argv[1], "u"); os.mkdir(d); n = 10000
names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
for p in names:
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
t = time.perf_counter()
for p in names:
    os.unlink(p)
print(f"{n / (time.perf_counter() - t):.0f}")
PY
)
    # shellcheck disable=SC2016 # fio expands $jobnum itself
    rw4=$(fio_iops "$m" rw4 --filename_format='rw4.$jobnum' --rw=randwrite --size=64M --numjobs=4)
    rw1=$(fio_iops "$m" rw1 --filename=rw1.0 --rw=randwrite --size=256M)
    # shellcheck disable=SC2016
    ap3=$(fio_iops "$m" ap3 --filename_format='ap3.$jobnum' --rw=write --size=256M --fdatasync=1 --numjobs=3)
    ap1=$(fio_iops "$m" ap1 --filename=ap1.0 --rw=write --size=256M --fdatasync=1)
    ch=$(python3 - "$m" "$SECS" <<'PY'
import os, sys, time
d, secs = os.path.join(sys.argv[1], "c"), float(sys.argv[2]); os.mkdir(d)
buf = os.urandom(65536)
n, t0 = 0, time.monotonic()
while time.monotonic() - t0 < secs:
    p = os.path.join(d, f"f{n % 8}")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, buf); os.fsync(fd); os.close(fd); os.unlink(p); n += 1
print(f"{n / (time.monotonic() - t0):.0f}")
PY
)
    echo "$un $rw4 $rw1 $ap3 $ap1 $ch"
}

printf '%-6s %-8s %8s %9s %9s %9s %9s %8s\n' round config unlink/s rw4_iops rw1_iops ap3_iops ap1_iops churn/s
for ((r = 1; r <= ROUNDS; r++)); do
    i=0
    for c in "${CONFIGS[@]}"; do
        i=$((i + 1))
        bench_on_fresh_pool "${c%:*}" 4G lines --threads "${c##*:}"
        read -r un rw4 rw1 ap3 ap1 ch <<<"$BENCH_OUT"
        printf '%-6s %-8s %8s %9s %9s %9s %9s %8s\n' "$r" "c$i" "$un" "$rw4" "$rw1" "$ap3" "$ap1" "$ch"
    done
done
i=0
for c in "${CONFIGS[@]}"; do
    i=$((i + 1))
    echo "c$i = ${c%:*} --threads ${c##*:}"
done
