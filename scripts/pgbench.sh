#!/usr/bin/env bash
# PostgreSQL 15 on a ferryfs mount: initdb (with data checksums) and start a server whose
# data directory lives inside the mount, run pgbench (-i -s 5, then -T 30), stop the server,
# verify every page checksum, check the row counts again after a remount, unmount, fsck.
#
# Run as root from anywhere in the repository. The server runs as user `postgres`.
# Environment:
#   PGBENCH_PORT      TCP port on 127.0.0.1 (default 54329)
#   PGBENCH_SECONDS   length of the timed run (default 30)
#   PGBENCH_SCALE     pgbench scale factor (default 5)
#   TRACK_SIZE        pool track size (default 64K)
#   KEEP_WORKDIR=1    keep the work directory (pool, logs) for inspection
set -euo pipefail

PORT="${PGBENCH_PORT:-54329}"
SECONDS_RUN="${PGBENCH_SECONDS:-30}"
SCALE="${PGBENCH_SCALE:-5}"
TRACK_SIZE="${TRACK_SIZE:-64K}"
PGBIN=/usr/lib/postgresql/15/bin

say() { printf '== %s\n' "$*"; }
die() { printf 'pgbench.sh: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the server is started as user postgres)"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# --- set-up ------------------------------------------------------------------------------
if [ ! -x "$PGBIN/initdb" ] || [ ! -x "$PGBIN/pgbench" ]; then
    say "installing postgresql-15"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-15
fi
id postgres >/dev/null 2>&1 || die "user postgres does not exist after installing postgresql-15"

say "building ferryfs (release)"
cargo build --release
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
FERRYFS="${TARGET_DIR:-$REPO/target}/release/ferryfs"
[ -x "$FERRYFS" ] || die "no binary at $FERRYFS"

WORK="$(mktemp -d /tmp/ferryfs-pgbench.XXXXXX)"
chmod 755 "$WORK"               # user postgres must reach the mount and the socket dir
POOL="$WORK/pool"
MNT="$WORK/mnt"
PGDATA="$MNT/pgdata"
RUNDIR="$WORK/run"              # socket and server log, outside the mount
mkdir -p "$MNT" "$RUNDIR"
chown postgres: "$RUNDIR"

as_pg() { runuser -u postgres -- "$@"; }

cleanup() {
    local rc=$?
    set +e
    if [ -f "$PGDATA/postmaster.pid" ]; then
        say "cleanup: stopping postgres"
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" stop -m immediate -w >/dev/null 2>&1
    fi
    if mountpoint -q "$MNT" 2>/dev/null; then
        say "cleanup: unmounting $MNT"
        "$FERRYFS" umount "$MNT" || fusermount3 -u "$MNT" || fusermount3 -uz "$MNT"
    fi
    if [ -f "$POOL/mounted" ]; then
        pid="$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$POOL/mounted")"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            sleep 2
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
    fi
    if [ "$rc" -ne 0 ]; then
        echo "---- postgres log (tail)"; tail -n 40 "$RUNDIR/postgres.log" 2>/dev/null
        echo "---- ferryfs mount.log (tail)"; tail -n 40 "$POOL/mount.log" 2>/dev/null
    fi
    if [ "${KEEP_WORKDIR:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    [ "$rc" -eq 0 ] && say "PASS" || echo "== FAIL (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- pool and mount ----------------------------------------------------------------------
say "pool $POOL (track size $TRACK_SIZE), mount $MNT"
"$FERRYFS" init "$POOL" --track-size "$TRACK_SIZE"
"$FERRYFS" volume add "$POOL" VOL001 --size 256M
"$FERRYFS" volume add "$POOL" VOL002 --size 2G
"$FERRYFS" mount "$POOL" "$MNT"
mkdir "$PGDATA"
chown postgres: "$PGDATA"
chmod 700 "$PGDATA"

# --- server --------------------------------------------------------------------------------
psql_pg() { as_pg "$PGBIN/psql" -X -q -t -A -h 127.0.0.1 -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
start_pg() {
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$RUNDIR/postgres.log" -w -t 120 start \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -k $RUNDIR -c fsync=on -c full_page_writes=on"
}

say "initdb (data checksums)"
as_pg "$PGBIN/initdb" -D "$PGDATA" --data-checksums -A trust -U postgres >"$RUNDIR/initdb.log"
say "starting postgres on 127.0.0.1:$PORT"
start_pg

say "pgbench -i -s $SCALE"
as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -i -s "$SCALE" -q postgres
say "pgbench -T $SECONDS_RUN -c 4 -j 2"
as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -T "$SECONDS_RUN" -c 4 -j 2 -P 10 postgres \
    | tee "$RUNDIR/pgbench.out"
grep -Eq '^number of failed transactions: 0( |$)' "$RUNDIR/pgbench.out" \
    || die "pgbench reports failed transactions"

# Consistency of what pgbench wrote: every account row is there, and the history of
# transactions adds up in branches, tellers and accounts alike.
check_counts() {
    local accounts delta_a delta_b delta_t hist
    accounts="$(psql_pg -c 'SELECT count(*) FROM pgbench_accounts')"
    [ "$accounts" -eq $((SCALE * 100000)) ] || die "pgbench_accounts has $accounts rows"
    hist="$(psql_pg -c 'SELECT coalesce(sum(delta),0) FROM pgbench_history')"
    delta_a="$(psql_pg -c 'SELECT sum(abalance) FROM pgbench_accounts')"
    delta_b="$(psql_pg -c 'SELECT sum(bbalance) FROM pgbench_branches')"
    delta_t="$(psql_pg -c 'SELECT sum(tbalance) FROM pgbench_tellers')"
    [ "$hist" = "$delta_a" ] && [ "$hist" = "$delta_b" ] && [ "$hist" = "$delta_t" ] \
        || die "balances disagree: history $hist, accounts $delta_a, branches $delta_b, tellers $delta_t"
    echo "accounts $accounts, sum of deltas $hist (branches, tellers, accounts agree)"
}
check_counts
if [ -x "$PGBIN/pg_amcheck" ]; then
    say "pg_amcheck (heap and btree)"
    psql_pg -c 'CREATE EXTENSION IF NOT EXISTS amcheck'
    as_pg "$PGBIN/pg_amcheck" -h 127.0.0.1 -p "$PORT" -d postgres --heapallindexed
fi

say "stopping postgres"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" stop -m fast -w
say "pg_checksums --check"
as_pg "$PGBIN/pg_checksums" --check -D "$PGDATA"

# --- remount: the same data, read back from the volumes --------------------------------------
say "remount"
"$FERRYFS" umount "$MNT"
"$FERRYFS" fsck "$POOL"
"$FERRYFS" mount "$POOL" "$MNT"
as_pg "$PGBIN/pg_checksums" --check -D "$PGDATA"
start_pg
check_counts
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" stop -m fast -w

"$FERRYFS" volume list "$MNT"
say "unmount and fsck"
"$FERRYFS" umount "$MNT"
"$FERRYFS" fsck "$POOL"
