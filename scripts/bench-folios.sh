#!/usr/bin/env bash
# Why warm 4 KiB random reads through the mount stay under native: the page cache's folio
# sizes. A warm read never reaches the daemon (ferryfs opens with FOPEN_KEEP_CACHE); it is the
# kernel's page-cache lookup alone, and its cost depends on how large the cached folios are.
#
# Prints, for a file written and read back natively and through a ferryfs mount, how many
# folios of which size cache it (page-map walk, scripts/lib/folios.py), then warm 4 KiB random
# reads, interleaved round by round, of:
#   native      the file on the backing file system (large folios: ext4, xfs)
#   ferryfs     the same file through a ferryfs mount
#   tmpfs-4k    the file on a tmpfs mounted with huge=never (single-page folios)
#   tmpfs-2m    the file on a tmpfs mounted with huge=always (2 MiB folios)
# The two tmpfs lines differ only in the folio size: they measure what single-page folios
# cost the same reads, with no FUSE and no daemon.
#
#   scripts/bench-folios.sh
#
# Environment (all optional):
#   BENCH_FOLIOS_SIZE=1G       the file's size
#   BENCH_FOLIOS_ROUNDS=3      rounds
#   BENCH_FOLIOS_SECS=5        seconds of each timed fio job (after a 1 s ramp)
#   BENCH_DIR=DIR              where the temporary directories go (default: under /var/tmp)
#
# Needs root (FUSE and tmpfs mounts, /proc/kpageflags) and fio (scripts/deps.sh --bench).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh
SIZE=${BENCH_FOLIOS_SIZE:-1G}
ROUNDS=${BENCH_FOLIOS_ROUNDS:-3}
SECS=${BENCH_FOLIOS_SECS:-5}
[[ $(id -u) == 0 ]] || { echo "bench-folios.sh: needs root (FUSE and tmpfs mounts, /proc/kpageflags)" >&2; exit 2; }
command -v fio >/dev/null || scripts/deps.sh --bench >/dev/null
bin=$(bench_checkout_build)
bench_workdir folios
cleanup() {
    bench_umount_pool
    for t in "$B/tmpfs-4k" "$B/tmpfs-2m"; do
        if mountpoint -q "$t" 2>/dev/null; then umount "$t" || umount -l "$t" || true; fi
    done
    rm -rf --one-file-system "$B"
}
trap cleanup EXIT INT TERM

FERRY=$bin
"$bin" init "$B/pool" >/dev/null
"$bin" volume add "$B/pool" V1 --size "$(numfmt --from=iec "$SIZE" | awk '{ printf "%d", $1 * 1.5 }')" >/dev/null
mkdir -p "$B/mnt" "$B/native" "$B/tmpfs-4k" "$B/tmpfs-2m"
"$bin" mount "$B/pool" "$B/mnt" >/dev/null
MNT=$B/mnt
tmpfs_size=$(numfmt --from=iec "$SIZE" | awk '{ printf "%d", $1 * 1.25 }')
mount -t tmpfs -o "size=$tmpfs_size,huge=never,mode=0700" tmpfs "$B/tmpfs-4k"
mount -t tmpfs -o "size=$tmpfs_size,huge=always,mode=0700" tmpfs "$B/tmpfs-2m"
declare -A DIR=([native]=$B/native [ferryfs]=$B/mnt [tmpfs-4k]=$B/tmpfs-4k [tmpfs-2m]=$B/tmpfs-2m)
CONFIGS=(native ferryfs tmpfs-4k tmpfs-2m)

fio_run() { # DIR NAME RW BS ARGS... -> read IOPS
    local dir=$1 name=$2 rw=$3 bs=$4
    shift 4
    fio --name="$name" --directory="$dir" --filename=bench.dat --ioengine=psync --rw="$rw" --bs="$bs" \
        --size="$SIZE" --fallocate=none --invalidate=0 --group_reporting --output-format=json \
        --output="$B/fio.json" "$@" >/dev/null
    python3 -c "import json; print('%.0f' % json.load(open('$B/fio.json'))['jobs'][0]['read']['iops'])"
}

log "laying out $SIZE in each configuration"
for c in "${CONFIGS[@]}"; do
    fio --name=layout --directory="${DIR[$c]}" --filename=bench.dat --ioengine=psync --rw=write --bs=1M \
        --size="$SIZE" --fallocate=none --end_fsync=1 >/dev/null
done

echo "folios caching the first 256 MiB after one sequential read with 1 MiB blocks"
for c in "${CONFIGS[@]}"; do
    fio_run "${DIR[$c]}" warm read 1M >/dev/null
    printf '  %-9s %s\n' "$c" "$(python3 scripts/lib/folios.py "${DIR[$c]}/bench.dat" 256)"
done

declare -A RUNS
for ((r = 1; r <= ROUNDS; r++)); do
    for c in "${CONFIGS[@]}"; do
        sync
        fio_run "${DIR[$c]}" warm read 1M >/dev/null
        v=$(fio_run "${DIR[$c]}" randread randread 4k --time_based --runtime="$SECS" --ramp_time=1)
        RUNS[$c]+="$v "
        log "warm rand read 4KiB [$c #$r]: $v IOPS"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
echo
echo "warm 4 KiB random reads, IOPS (runs; median; median / the reference)"
n=$(median <<<"${RUNS[native]}")
t2=$(median <<<"${RUNS[tmpfs-2m]}")
for c in "${CONFIGS[@]}"; do
    m=$(median <<<"${RUNS[$c]}")
    case $c in
        tmpfs-4k) ref="$(bench_ratio "$m" "$t2") x tmpfs-2m" ;;
        tmpfs-2m) ref="-" ;;
        *) ref="$(bench_ratio "$m" "$n") x native" ;;
    esac
    printf '  %-9s %-30s %9s  %s\n' "$c" "${RUNS[$c]}" "$m" "$ref"
done
