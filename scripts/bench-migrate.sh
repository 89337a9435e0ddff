#!/usr/bin/env bash
# The migration benchmark: how long a migration takes, whether it converges under writes, and
# what it costs the applications, each line as a ratio against a baseline measured in the same
# run, on the same backing file system, with its target next to it.
#
#   scripts/bench-migrate.sh                 # full run: 1 GiB data sets, medians of 3 (about 15 min)
#   BENCH_QUICK=1 scripts/bench-migrate.sh   # quick check: 256 MiB, one run per line (about 4 min)
#
# The lines:
#   1. migrate a data set with no load (`ferryfs migrate --wait`, from the command's start to
#      the job's durable switch) against `cp` of the same bytes + `sync` between two plain
#      files; the page cache is dropped before each copy (cold source for both). A second row:
#      to the job's end, once the source is punched and freed, against cp + sync + rm + sync;
#      a third: the command's own time (`time ferryfs migrate --wait`), against the same.
#   2. the same migration under fio random 4 KiB writes at iodepth 16 on the data set being
#      migrated: it must switch while fio still runs; passes, mirrored writes, job time, and
#      fio's throughput before and during the job.
#   3. write latency of an application on other data sets of the same volumes (4 KiB random
#      writes, O_SYNC, a low fixed rate): p99 and max with no job and during the bulk copy.
#   4. the live cutover's write stall (stall_us) and the close cutover's window (window_us),
#      several runs under a steady writer: median and max.
#   5. write throughput on a data set while a job tracks its writes (a job held in its copy
#      phase by a very low --rate) against the same with no job.
#   7. a sparse data set of 100 times the size holding the size in data (64 runs spread over
#      it) migrates against the dense data set of line 1, interleaved, each cold: holes cost
#      the copier nothing, so it should take about as long.
#   6. qemu-storage-daemon's blockdev-mirror of a raw image of the same size to another raw
#      image on the same disk, side by side with lines 1 and 2 (no load, and under the same
#      fio job through an NBD export).
#
# Environment (all optional):
#   BENCH_SIZE=1G          size of the migrated data sets (a fio size: 256M, 1G, ...)
#   BENCH_REPEAT=3         runs of lines 1, 2, 3 and 6 (medians; line 1 and 6 after a warm-up round)
#   BENCH_CUT_SIZE=256M    size of the data set of line 4
#   BENCH_CUT_RUNS=5       runs of each cutover mode in line 4
#   BENCH_CUT_IOPS=1000    rate of the writer of line 4 (4 KiB writes per second)
#   BENCH_LAT_RUNTIME=8    seconds of each latency run of line 3
#   BENCH_LAT_IOPS=100     rate of each latency writer of line 3
#   BENCH_TRK_RUNTIME=8    seconds of each throughput run of line 5 (after a 2 s ramp)
#   BENCH_TRK_REPEAT=6     pairs of line-5 runs (job, no job; the ratio is the median of the
#                          pairs' ratios)
#   BENCH_LOAD_TIMEOUT=300 seconds a job under load may take before it counts as not converging
#   BENCH_DIR=DIR          where to build the temporary directories (default: under /var/tmp);
#                          this directory's file system is the one measured
#   BENCH_KEEP_RESULTS=FILE    also write the raw results (one JSON object per run) to FILE
#   BENCH_WARM_MIB=N       memory touched and freed right before each timed run, after the page
#                          cache is dropped (default: twice the size + 512 MiB; 0: none; see
#                          bench_warm_memory in scripts/lib/bench-common.sh)
#   BENCH_LINES="1 2 3 4 5 6 7"  run only these lines (line 6 runs with 1 and 2)
#   BENCH_FERRYFS=PATH     measure this ferryfs binary instead of building the checkout's
#
# Needs root (drop_caches, FUSE mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ -n "${BENCH_QUICK:-}" && "${BENCH_QUICK}" != 0 ]]; then
    : "${BENCH_SIZE:=256M}" "${BENCH_REPEAT:=1}" "${BENCH_CUT_SIZE:=64M}" "${BENCH_CUT_RUNS:=2}"
    : "${BENCH_LAT_RUNTIME:=4}" "${BENCH_TRK_RUNTIME:=4}" "${BENCH_TRK_REPEAT:=1}" "${BENCH_LOAD_TIMEOUT:=120}"
fi
SIZE=${BENCH_SIZE:-1G}
REPEAT=${BENCH_REPEAT:-3}
CUT_SIZE=${BENCH_CUT_SIZE:-256M}
CUT_RUNS=${BENCH_CUT_RUNS:-5}
CUT_IOPS=${BENCH_CUT_IOPS:-1000}
LAT_RUNTIME=${BENCH_LAT_RUNTIME:-8}
LAT_IOPS=${BENCH_LAT_IOPS:-100}
TRK_RUNTIME=${BENCH_TRK_RUNTIME:-8}
TRK_RAMP=2
TRK_REPEAT=${BENCH_TRK_REPEAT:-6}
LOAD_TIMEOUT=${BENCH_LOAD_TIMEOUT:-300}
# Line 2: fio runs alone this long (ramp, then the "before" throughput) before the job starts,
# and this long after the switch.
LOAD_RAMP=2
LOAD_BEFORE=5
LOAD_AFTER=3
LAT_SIZE=64M

if [[ $(id -u) -ne 0 ]]; then
    echo "bench-migrate: run as root (drop_caches and FUSE mounts need it)" >&2
    exit 1
fi

scripts/deps.sh --bench
# Line 6 needs qemu-storage-daemon (Debian: qemu-utils); without it the line is skipped.
if ! command -v qemu-storage-daemon >/dev/null; then
    echo "installing: qemu-utils"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils; } >/dev/null 2>&1 ||
        echo "bench-migrate: qemu-storage-daemon is missing and qemu-utils did not install; line 6 is skipped" >&2
fi
if [[ -n "${BENCH_FERRYFS:-}" ]]; then
    FERRY=$BENCH_FERRYFS # another build of ferryfs, to compare two in the same conditions
else
    cargo build --release --quiet
    FERRY="$ROOT/target/release/ferryfs"
fi
REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]]; then REV="$REV+local changes in src"; fi

SIZE_BYTES=$(numfmt --from=iec "${SIZE%B}")
CUT_BYTES=$(numfmt --from=iec "${CUT_SIZE%B}")
LAT_BYTES=$(numfmt --from=iec "$LAT_SIZE")
# Each volume can hold every data set at once, plus a job's target (images are sparse).
VOL_BYTES=$((SIZE_BYTES * 5 + CUT_BYTES * 2 + LAT_BYTES * 2 + (1 << 30)))

BASE=${BENCH_DIR:-/var/tmp}
mkdir -p "$BASE"
B=$(mktemp -d "$BASE/ferryfs-bench-migrate.XXXXXX")
POOL=$B/pool
MNT=$B/mnt
RESULTS=$B/results.jsonl
PY=$B/bench.py
mkdir -p "$MNT" "$B/plain" "$B/qemu"
BG_PIDS=()

# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in "${BG_PIDS[@]}"; do
        kill -INT "$p" 2>/dev/null || true
    done
    for p in "${BG_PIDS[@]}"; do
        # fio and the writers end on SIGINT; give them a moment, then insist.
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$p" 2>/dev/null || true
    done
    if [[ -f "$B/qemu/daemon.pid" ]]; then
        kill "$(cat "$B/qemu/daemon.pid")" 2>/dev/null || true
    fi
    if mountpoint -q "$MNT" 2>/dev/null; then
        "$FERRY" umount "$MNT" 2>/dev/null || fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null || true
    fi
    bench_finish "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LINES=" ${BENCH_LINES:-1 2 3 4 5 6 7} "
want() { # LINE... -> whether any of them is to run
    local l
    for l in "$@"; do [[ "$LINES" == *" $l "* ]] && return 0; done
    return 1
}
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; }
now_ms() { local t=$EPOCHREALTIME; echo "${t%.*}${t#*.}" | cut -c1-13; }
# Before each timed run: the page cache dropped (a cold source), then memory for twice the
# data set and some touched and freed, so that no run pays the host's faults of memory that
# rested (bench-common.sh).
drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    bench_warm_memory "$SIZE_BYTES"
}
record() { # KEY JSON-OBJECT: one line of the results, tagged with its key
    sed "s/^{/{\"k\":\"$1\",/" <<<"$2" >>"$RESULTS"
}
bg_forget() { # drop a finished pid from BG_PIDS
    local keep=() p
    for p in "${BG_PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
    BG_PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------------------------------
# Helpers in python3: job status waits, fio JSON and log parsing, the close-mode writer, the
# QMP client of the mirror line, and the report.
cat >"$PY" <<'EOF'
import json, os, random, signal, socket, statistics, subprocess, sys, time
from datetime import datetime, timezone

FINAL = ("switched", "cancelled", "failed", "stopped")

def jload(path):
    with open(path) as f:
        text = f.read()
    # fio prints warnings (and "terminating on signal") before its JSON document.
    return json.loads(text[text.index("{"):])

def status(mnt):
    with open(os.path.join(mnt, ".ferry", "status")) as f:
        return json.load(f)

def find_job(mnt, jid):
    for j in status(mnt)["jobs"]:
        if j["id"] == jid:
            return j
    return None

def events(mnt, jid):
    """{kind: epoch ns} of a job's events."""
    out = {}
    with open(os.path.join(mnt, ".ferry", "events")) as f:
        for line in f:
            w = line.split()
            if len(w) >= 4 and w[1] == "job" and w[2] == str(jid):
                t = datetime.strptime(w[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
                out.setdefault(w[3], int(t.timestamp() * 1e6) * 1000)
    return out

def wait(mnt, jid, timeout, phases="final"):
    """Poll the job until its phase is one of `phases`; print it as JSON (timed_out if not)."""
    jid = int(jid)
    want = FINAL if phases == "final" else tuple(phases.split(","))
    end = time.time() + float(timeout)
    j = None
    while True:
        j = find_job(mnt, jid)
        if j and j["phase"] in want:
            j["timed_out"] = False
            break
        if j and j["phase"] in FINAL and phases != "final":
            j["timed_out"] = False
            break
        if time.time() > end:
            j = dict(j or {"id": jid})
            j["timed_out"] = True
            break
        time.sleep(0.1)
    j["events"] = events(mnt, jid)
    print(json.dumps(j))

def where(mnt, path):
    out = subprocess.run([os.environ["FERRY"], "ls", mnt, path, "--json"], check=True, capture_output=True, text=True).stdout
    d = json.loads(out)["data_sets"][0]
    print(d["volumes"][0])

def max_job(mnt):
    print(max([j["id"] for j in status(mnt)["jobs"]], default=0))

def fio_jobs(path):
    """Per fio job: IOPS, MiB/s, completion latency p99, max and mean (us)."""
    d = jload(path)
    out = {}
    for j in d["jobs"]:
        w = j["write"]
        c = w.get("clat_ns", {})
        pct = c.get("percentile", {})
        out[j["jobname"]] = {
            "iops": w["iops"], "mib_s": w["bw"] / 1024, "ios": w["total_ios"],
            "p99_us": pct.get("99.000000", 0) / 1e3, "max_us": c.get("max", 0) / 1e3,
            "mean_us": c.get("mean", 0) / 1e3,
        }
    return out, d.get("timestamp_ms", 0)

def log_rows(path):
    rows = []
    with open(path) as f:
        for line in f:
            p = line.split(",")
            if len(p) >= 2:
                rows.append((int(p[0]), int(p[1])))
    return rows

def bw_mean(rows, t0, t1):
    """Mean MiB/s of fio bandwidth-log samples (KiB/s) stamped within [t0, t1] ms."""
    v = [b for t, b in rows if t0 <= t <= t1]
    return sum(v) / len(v) / 1024 if v else float("nan")

def lat_stats(rows, t0, t1):
    """p99 and max (us) of per-I/O latency-log entries (ns) completed within [t0, t1] ms."""
    v = sorted(l for t, l in rows if t0 <= t <= t1)
    if not v:
        return float("nan"), float("nan"), 0
    return v[min(len(v) - 1, int(len(v) * 0.99))] / 1e3, v[-1] / 1e3, len(v)

def load_result(job_json, fio_json, bw_log, fio_start_ms, t0_ms, ramp_s):
    """Line 2: the job under fio, and fio's throughput before, during and after the job."""
    j = json.loads(job_json)
    _, fio_end_ms = fio_jobs(fio_json)
    rows = log_rows(bw_log)
    ended_ms = (j.get("ended_ns") or 0) / 1e6
    switched = j.get("phase") == "switched"
    r = {
        "phase": j.get("phase"), "timed_out": j.get("timed_out"),
        "converged": bool(switched and ended_ms < fio_end_ms),
        "job_s": (ended_ms - int(t0_ms)) / 1e3 if ended_ms else None,
        "passes": j.get("passes"), "mirrored": j.get("mirrored"), "mirrored_writes": j.get("mirrored_writes"),
        "resynced_mib": (j.get("bytes_resynced") or 0) / 2**20, "stall_us": j.get("stall_us"),
        "copy_done_s": (j["events"]["copy-done"] / 1e6 - int(t0_ms)) / 1e3 if "copy-done" in j.get("events", {}) else None,
        "mirror_on_s": (j["events"]["mirror-on"] / 1e6 - int(t0_ms)) / 1e3 if "mirror-on" in j.get("events", {}) else None,
        "fio_before": bw_mean(rows, int(fio_start_ms) + 1000 * float(ramp_s), int(t0_ms)),
        "fio_during": bw_mean(rows, int(t0_ms), ended_ms or fio_end_ms),
        "fio_after": bw_mean(rows, ended_ms, fio_end_ms) if ended_ms else float("nan"),
    }
    print(json.dumps(r))

def lat_result(prefix, phase, t0_ms, t1_ms, job_json, src_vol):
    """Line 3: one latency run (two writers, one data set on each volume). The writes that
    count are those completed after t0 (the lead-in is over, or the job started) and, with a
    job, before the end of its bulk copy."""
    lo, hi = int(t0_ms), 1 << 62
    r = {"phase": phase, "src_vol": src_vol, "writers": {}}
    if job_json:
        j = json.loads(job_json)
        cd = j.get("events", {}).get("copy-done")
        t1 = int(t1_ms)
        hi = min(t1, cd / 1e6) if cd else t1
        r["overlap"] = max(0.0, (hi - lo) / (t1 - lo))
        r["window_s"] = (hi - lo) / 1e3
        r["copied_mib"] = (j.get("bytes_copied") or 0) / 2**20
        r["job_phase"] = j.get("phase")
    for n, name in ((1, "lat-V1"), (2, "lat-V2")):
        v = sorted(l // 1000 for t, l in log_rows(f"{prefix}_clat.{n}.log") if lo <= t <= hi)
        r["writers"][name] = {
            "n": len(v), "p99_us": v[min(len(v) - 1, int(len(v) * 0.99))] if v else None,
            "max_us": v[-1] if v else None, "lat_us": v,
        }
    print(json.dumps(r))

def live_result(job_json, lat_log, fio_start_ms, t0_ms):
    """Line 4, live: the stall, and the writer's latency before the job and during it."""
    j = json.loads(job_json)
    rows = log_rows(lat_log)
    ended_ms = (j.get("ended_ns") or 0) / 1e6
    b99, bmax, bn = lat_stats(rows, int(fio_start_ms) + 500, int(t0_ms))
    d99, dmax, dn = lat_stats(rows, int(t0_ms), ended_ms + 100)
    print(json.dumps({
        "mode": "live", "phase": j.get("phase"), "stall_us": j.get("stall_us"), "passes": j.get("passes"),
        "mirrored": j.get("mirrored"), "job_s": (ended_ms - int(t0_ms)) / 1e3 if ended_ms else None,
        "writer_p99_before_us": b99, "writer_max_before_us": bmax,
        "writer_p99_during_us": d99, "writer_max_during_us": dmax,
    }))

def closewriter(mnt, path, rate, minjob, timeout):
    """Line 4, close: write 4 KiB blocks at `rate`/s until the job asks for a close; stop
    writing, let the copier re-sync what is dirty, close, and wait for the switch."""
    rate, minjob, timeout = float(rate), int(minjob), float(timeout)
    fd = os.open(os.path.join(mnt, path.lstrip("/")), os.O_RDWR)
    blocks = os.fstat(fd).st_size // 4096
    buf = os.urandom(4096)
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    t_end = time.time() + timeout
    nxt = time.time()
    last_poll = 0.0
    jid = None
    writes = 0
    j = None
    while time.time() < t_end and not stop:
        now = time.time()
        if now - last_poll > 0.05:
            last_poll = now
            js = [x for x in status(mnt)["jobs"] if x["path"] == path and x["id"] > minjob]
            if js:
                j = js[-1]
                jid = j["id"]
                if j["phase"] == "awaiting-close" or j["phase"] in FINAL:
                    break
        os.pwrite(fd, buf, random.randrange(blocks) * 4096)
        writes += 1
        nxt += 1.0 / rate
        d = nxt - time.time()
        if d > 0:
            time.sleep(d)
    if jid is None or j["phase"] != "awaiting-close":
        os.close(fd)
        print(json.dumps({"mode": "close", "phase": j["phase"] if j else None, "error": "the job never asked for a close"}))
        return
    t_stop = time.time()
    while time.time() - t_stop < 3:
        j = find_job(mnt, jid)
        if j["dirty_tracks"] == 0:
            break
        time.sleep(0.02)
    dirty = j["dirty_tracks"]
    t_close = time.time_ns()
    os.close(fd)
    while time.time() < t_end + 30:
        j = find_job(mnt, jid)
        if j["phase"] in FINAL:
            break
        time.sleep(0.02)
    print(json.dumps({
        "mode": "close", "job": jid, "phase": j["phase"], "window_us": j.get("window_us"),
        "dirty_tracks_at_close": dirty, "close_to_switched_ms": ((j.get("ended_ns") or 0) - t_close) / 1e6,
        "passes": j.get("passes"), "mirrored": j.get("mirrored"), "writes": writes,
    }))

def qmp_mirror(src, dst, workdir, before_s, after_s, *fio):
    """Line 6: blockdev-mirror src -> dst (raw files) in a qemu-storage-daemon, over QMP.
    With a fio command after the other arguments: export src over NBD (unix socket), run fio
    on it, and start the mirror after before_s seconds. Prints the times as JSON."""
    sock = os.path.join(workdir, "qmp.sock")
    nbd = os.path.join(workdir, "nbd.sock")
    for p in (sock, nbd):
        if os.path.exists(p):
            os.unlink(p)
    errlog = open(os.path.join(workdir, "daemon.log"), "a")
    d = subprocess.Popen(["qemu-storage-daemon", "--chardev", f"socket,path={sock},server=on,wait=off,id=qmp0",
                          "--monitor", "chardev=qmp0"], stdout=errlog, stderr=errlog)
    with open(os.path.join(workdir, "daemon.pid"), "w") as f:
        f.write(str(d.pid))
    fio_p = None
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        f = s.makefile("rw")
        evs = []
        def recv():
            return json.loads(f.readline())
        def cmd(c, **a):
            f.write(json.dumps({"execute": c, "arguments": a}) + "\n")
            f.flush()
            while True:
                m = recv()
                if "return" in m:
                    return m["return"]
                if "error" in m:
                    raise RuntimeError(f"{c}: {m['error']['desc']}")
                evs.append(m)
        recv()
        cmd("qmp_capabilities")
        cmd("blockdev-add", driver="raw", **{"node-name": "src"}, file={"driver": "file", "filename": src})
        cmd("blockdev-add", driver="raw", **{"node-name": "dst"}, file={"driver": "file", "filename": dst})
        fio_start = None
        if fio:
            cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
            cmd("block-export-add", type="nbd", id="e0", **{"node-name": "src"}, name="src", writable=True)
            fio_start = int(time.time() * 1000)
            fio_p = subprocess.Popen(list(fio), stdout=subprocess.DEVNULL, stderr=errlog)
            time.sleep(float(before_s))
        t0 = time.time()
        cmd("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "dst", "sync": "full"})
        ready = None
        while True:
            m = evs.pop(0) if evs else recv()
            e = m.get("event")
            if e == "BLOCK_JOB_READY" and ready is None:
                ready = time.time()
                cmd("block-job-complete", device="m0")
            elif e == "BLOCK_JOB_COMPLETED":
                if m["data"].get("error"):
                    raise RuntimeError("mirror: " + m["data"]["error"])
                done = time.time()
                moved = m["data"]["len"]
                break
        # Durable, as the other two lines are: flush the target file.
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        t1 = time.time()
        running = fio_p is not None and fio_p.poll() is None
        if fio_p is not None:
            time.sleep(float(after_s))
            fio_p.send_signal(signal.SIGINT)
            fio_p.wait(timeout=60)
            cmd("block-export-del", id="e0")
            time.sleep(0.2)
        print(json.dumps({
            "total_s": t1 - t0, "ready_s": ready - t0 if ready else None, "completed_s": done - t0,
            "bytes_moved": moved, "converged": running if fio else None,
            "t0_ms": int(t0 * 1000), "done_ms": int(t1 * 1000), "fio_start_ms": fio_start,
        }))
    finally:
        if fio_p is not None and fio_p.poll() is None:
            fio_p.send_signal(signal.SIGINT)
            try:
                fio_p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                fio_p.kill()
        try:
            cmd("quit")
        except Exception:
            pass
        try:
            d.wait(timeout=10)
        except subprocess.TimeoutExpired:
            d.kill()
        os.unlink(os.path.join(workdir, "daemon.pid"))

def qemu_load_result(mirror_json, fio_json, bw_log, ramp_s):
    m = json.loads(mirror_json)
    _, fio_end_ms = fio_jobs(fio_json)
    rows = log_rows(bw_log)
    m["fio_before"] = bw_mean(rows, m["fio_start_ms"] + 1000 * float(ramp_s), m["t0_ms"])
    m["fio_during"] = bw_mean(rows, m["t0_ms"], m["done_ms"])
    m["converged"] = bool(m["converged"] and m["done_ms"] < fio_end_ms)
    print(json.dumps(m))

# ---------------------------------------------------------------------------------------
def med(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else float("nan")

def report(results_path, meta_json):
    m = json.loads(meta_json)
    rs = [json.loads(l) for l in open(results_path)]
    by = lambda k: [r for r in rs if r["k"] == k]
    rows = []   # (line, measured, baseline, ratio, target, met)
    fmt_s = lambda x: f"{x:.2f} s"
    ms = lambda us: f"{us / 1000:.2f} ms"

    # 1 and 6, no load.
    cp = [r["s"] for r in by("l1.cp")]
    fe = [r["s"] for r in by("l1.ferry")]
    qe = [r["total_s"] for r in by("l6.qemu")]
    if cp and fe:
        ratio = med(fe) / med(cp)
        rows.append((f"1. migrate {m['size']}, no load (start to durable switch)", fmt_s(med(fe)), f"cp + sync {fmt_s(med(cp))}",
                     f"{ratio:.2f}x", "<= 1.0x", "yes" if ratio <= 1.0 else "NO"))
        rel = [r["released_s"] for r in by("l1.ferry") if "released_s" in r]
        mv = [r["s"] + r["rm_s"] for r in by("l1.cp") if "rm_s" in r]
        if rel and mv:
            rows.append(("   to the source freed (the job's end)", fmt_s(med(rel)), f"cp + sync + rm + sync {fmt_s(med(mv))}",
                         f"{med(rel) / med(mv):.2f}x", "(none)", "-"))
        cmd = [r["cmd_s"] for r in by("l1.ferry") if "cmd_s" in r]
        if cmd and mv:
            rows.append(("   the command (`ferryfs migrate --wait`)", fmt_s(med(cmd)), f"cp + sync + rm + sync {fmt_s(med(mv))}",
                         f"{med(cmd) / med(mv):.2f}x", "(none)", "-"))
    # 2, under load.
    ld = by("l2.ferry")
    if ld and fe:
        conv = sum(1 for r in ld if r["converged"])
        js = med([r["job_s"] for r in ld])
        rows.append((f"2. migrate {m['size']} under fio randwrite 4K qd16",
                     f"{js:.1f} s; switched under load {conv}/{len(ld)}", f"no-load migrate {fmt_s(med(fe))}",
                     f"{js / med(fe):.1f}x", "converges", "yes" if conv == len(ld) else "NO"))
        rows.append(("   passes / mirrored writes / re-copied",
                     f"{med([r['passes'] for r in ld]):.0f} / " + "/".join("on" if r["mirrored"] else "off" for r in ld)
                     + f" / {med([r['resynced_mib'] for r in ld]) / 1024:.1f} GiB", "", "", "", ""))
        fb, fd = med([r["fio_before"] for r in ld]), med([r["fio_during"] for r in ld])
        rows.append(("   fio MiB/s during the job", f"{fd:.1f} MiB/s", f"before the job {fb:.1f} MiB/s",
                     f"{fd / fb:.2f}x", "(none)", "-"))
        st = [r["stall_us"] for r in ld if r["stall_us"] is not None]
        if st:
            rows.append(("   live stall under this load", f"median {ms(med(st))}, max {ms(max(st))}", "", "", "<= 5 ms",
                         "yes" if max(st) <= 5000 else "NO"))
    # 3, latency: the writes of every run pooled, per phase and volume role.
    lat = by("l3")
    if lat:
        def pooled(phase, role):
            v = []
            for r in lat:
                if r["phase"] != phase:
                    continue
                vol = r["src_vol"] if role == "source" else ("V2" if r["src_vol"] == "V1" else "V1")
                v += r["writers"][f"lat-{vol}"]["lat_us"]
            v.sort()
            return (v[min(len(v) - 1, int(len(v) * 0.99))], v[-1], len(v)) if v else (float("nan"), float("nan"), 0)
        for role in ("source", "target"):
            b99, bmx, bn = pooled("before", role)
            d99, dmx, dn = pooled("during", role)
            ratio = d99 / b99
            rows.append((f"3. O_SYNC 4K write p99, data set on the {role} volume", f"{ms(d99)} ({dn} writes)",
                         f"no job {ms(b99)} ({bn} writes)", f"{ratio:.2f}x", "<= 2x", "yes" if ratio <= 2 else "NO"))
            rows.append((f"   max, {role} volume", ms(dmx), f"no job {ms(bmx)}", f"{dmx / bmx:.2f}x", "(none)", "-"))
        cr = [r["copied_mib"] / r["window_s"] for r in lat if r["phase"] == "during" and r.get("window_s")]
        rows.append(("   bulk copy rate while they write", f"{med(cr):.0f} MiB/s", f"no load {m['size_mib'] / med(fe):.0f} MiB/s" if fe else "",
                     f"{med(cr) / (m['size_mib'] / med(fe)):.2f}x" if fe else "", "(none)", "-"))
    # 4, cutovers.
    lv = [r for r in by("l4") if r["mode"] == "live"]
    if lv:
        st = [r["stall_us"] for r in lv if r["stall_us"] is not None]
        bmax = med([r["writer_max_before_us"] for r in lv])
        dmax = med([r["writer_max_during_us"] for r in lv])
        rows.append((f"4. live stall ({len(st)} runs, {m['cut_size']}, writer {m['cut_iops']}/s)",
                     f"median {ms(med(st))}, max {ms(max(st))}", f"writer's max latency, no job {ms(bmax)}",
                     f"{max(st) / bmax:.2f}x", "<= 5 ms", "yes" if max(st) <= 5000 else "NO"))
        rows.append(("   writer's max latency during the job", ms(dmax), f"no job {ms(bmax)}", f"{dmax / bmax:.2f}x", "(none)", "-"))
    cl = [r for r in by("l4") if r["mode"] == "close"]
    if cl:
        w = [r["window_us"] for r in cl if r.get("window_us") is not None]
        dirty = max(r.get("dirty_tracks_at_close", 0) or 0 for r in cl)
        c2s = med([r.get("close_to_switched_ms") for r in cl])
        if w:
            rows.append((f"4. close window ({len(w)} runs; final copy {dirty} tracks)",
                         f"median {ms(med(w))}, max {ms(max(w))}", f"close to switched {c2s:.1f} ms",
                         f"{max(w) / 10000:.2f}x target", "<= 10 ms + final copy", "yes" if max(w) <= 10000 else "NO"))
        else:
            rows.append(("4. close window", "no run switched", "", "", "<= 10 ms + final copy", "NO"))
    # 5, tracking: the median of the ratios of runs paired in time (the machine drifts).
    for pat, unit in (("rand4k", "IOPS"), ("seq1m", "MiB/s")):
        l5 = [r for r in by("l5") if r["pattern"] == pat]
        off = {r["rep"]: r["v"] for r in l5 if r["config"] == "off"}
        on = {r["rep"]: r["v"] for r in l5 if r["config"] == "on"}
        pairs = [on[k] / off[k] for k in sorted(off) if k in on and off[k] > 0]
        if pairs:
            ratio = med(pairs)
            label = "random 4K qd1" if pat == "rand4k" else "sequential 1M"
            f = (lambda x: f"{x:.0f} {unit}") if unit == "IOPS" else (lambda x: f"{x:.1f} {unit}")
            rows.append((f"5. write {label}, job tracking it", f(med(list(on.values()))), f"no job {f(med(list(off.values())))}",
                         f"{ratio:.3f}x (pairs {min(pairs):.2f}-{max(pairs):.2f})", ">= 0.97x", "yes" if ratio >= 0.97 else "NO"))
    # 7, sparse.
    sd, sp = [r["s"] for r in by("l7.nl")], [r["s"] for r in by("l7.sp")]
    if sd and sp:
        ratio = med(sp) / med(sd)
        rows.append((f"7. migrate a sparse {m['size']} x 100 holding {m['size']} of data", fmt_s(med(sp)),
                     f"dense {m['size']} {fmt_s(med(sd))}", f"{ratio:.2f}x", "about 1x (<= 1.2x)",
                     "yes" if ratio <= 1.2 else "NO"))
    # 6, qemu.
    if qe and fe and cp:
        rows.append((f"6. qemu blockdev-mirror {m['size']}, no load", fmt_s(med(qe)),
                     f"cp + sync {fmt_s(med(cp))}; ferryfs {fmt_s(med(fe))}", f"ferryfs/qemu {med(fe) / med(qe):.2f}x",
                     "(comparison)", "-"))
    ql = by("l6.qemu_load")
    if ql and ld:
        conv = sum(1 for r in ql if r["converged"])
        qfb, qfd = med([r["fio_before"] for r in ql]), med([r["fio_during"] for r in ql])
        rows.append((f"6. qemu mirror under the same fio (NBD export)",
                     f"{med([r['total_s'] for r in ql]):.1f} s; completed under load {conv}/{len(ql)}",
                     f"ferryfs under load {med([r['job_s'] for r in ld]):.1f} s",
                     f"ferryfs/qemu {med([r['job_s'] for r in ld]) / med([r['total_s'] for r in ql]):.1f}x", "(comparison)", "-"))
        rows.append(("   fio MiB/s during the mirror", f"{qfd:.1f} MiB/s", f"before {qfb:.1f} MiB/s", f"{qfd / qfb:.2f}x", "(none)", "-"))

    print()
    print(f"ferryfs migration benchmark: {m['size']} data sets, medians of {m['repeat']}, backing file system "
          f"{m['fstype']} ({m['dir']}), fio engine {m['engine']} for the iodepth-16 load; ferryfs {m['rev']}")
    print()
    w = [max(len(r[i]) for r in rows + [("line", "measured", "baseline (same run)", "ratio", "target", "met")]) for i in range(6)]
    hdr = ("line", "measured", "baseline (same run)", "ratio", "target", "met")
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(hdr)) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |")
    print()
    print("line 1: page cache dropped before each copy (cold source) for ferryfs, cp and qemu alike; each is")
    print("durable at its end (ferryfs: the switch is in the synced catalog; cp: sync; qemu: fsync of the target).")
    print("ferryfs then punches and frees the source (0.2-0.3 s per GiB on ext4), which cp does not; the")
    print("second row compares that end with cp + rm of the copy, i.e. a move across file systems.")
    print()
    print("all runs, in run order:")
    for k in ("l1.cp", "l1.ferry", "l6.qemu"):
        xs = by(k)
        if xs:
            print(f"  {k}: " + " ".join(f"{r.get('s', r.get('total_s')):.2f}" for r in xs) + " s")
    for r in by("l1.ferry"):
        print(f"  l1.ferry run: command {r['cmd_s']:.2f} s, copy {r['copy_s']:.2f} s, source freed {r.get('released_s', float('nan')):.2f} s, stall {r['stall_us']} us")
    for r in ld:
        print("  l2: " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "k"}))
    for r in by("l6.qemu_load"):
        print("  l6.load: " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in ("k", "t0_ms", "done_ms", "fio_start_ms")}))
    for r in lat:
        ws = "; ".join(f"{n} p99 {(x['p99_us'] or 0) / 1000:.2f} ms max {(x['max_us'] or 0) / 1000:.2f} ms ({x['n']} writes)" for n, x in sorted(r["writers"].items()))
        extra = f" (writes in the first {r['overlap'] * 100:.0f} % of the run, until copy-done; {r['copied_mib']:.0f} MiB copied)" if "overlap" in r else ""
        print(f"  l3 {r['phase']} (source {r['src_vol']}): {ws}{extra}")
    for r in by("l4"):
        print("  l4: " + json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k != "k"}))
    for pat in ("rand4k", "seq1m"):
        for c in ("off", "on"):
            xs = [r["v"] for r in by("l5") if r["pattern"] == pat and r["config"] == c]
            if xs:
                print(f"  l5 {pat} {c}: " + " ".join(f"{x:.1f}" for x in xs))

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    fns = {
        "wait": wait, "where": where, "max-job": max_job, "load-result": load_result, "lat-result": lat_result,
        "live-result": live_result, "closewriter": closewriter, "mirror": qmp_mirror,
        "qemu-load-result": qemu_load_result, "report": report,
    }
    if cmd == "fio":
        jobs, _ = fio_jobs(args[0])
        print(json.dumps(jobs))
    else:
        fns[cmd](*args)
EOF
export FERRY

# ---------------------------------------------------------------------------------------
# The pool: two volumes in the same file system; data sets made of random bytes.
log "bench dir $B ($(df -T "$B" | awk 'NR==2{print $2" on "$1}'))"
"$FERRY" init "$POOL" >/dev/null
"$FERRY" volume add "$POOL" V1 --size "$VOL_BYTES" >/dev/null
"$FERRY" volume add "$POOL" V2 --size "$VOL_BYTES" >/dev/null
"$FERRY" mount "$POOL" "$MNT" >/dev/null

SRC=$B/plain/src.dat
log "writing $SIZE of random bytes"
head -c "$SIZE_BYTES" /dev/urandom >"$SRC"

where() { python3 "$PY" where "$MNT" "$1"; }
other() { if [[ $(where "$1") == V1 ]]; then echo V2; else echo V1; fi; }
start_job() { # PATH VOL [options] -> job id
    local p=$1 v=$2
    shift 2
    local reply
    reply=$("$FERRY" migrate "$MNT" "$p" --to "$v" "$@")
    [[ "$reply" == "ok jobs "* ]] || { echo "bench-migrate: migrate $p: $reply" >&2; return 1; }
    echo "${reply#ok jobs }"
}
place() { # PATH VOL: move the data set there if it isn't (untimed set-up)
    if [[ $(where "$1") != "$2" ]]; then
        "$FERRY" migrate "$MNT" "$1" --to "$2" --wait >/dev/null
    fi
}
make_set() { # NAME BYTES VOL
    dd if="$SRC" of="$MNT/$1" bs=1M count=$(($2 >> 20)) iflag=fullblock conv=fsync status=none
    place "/$1" "$3"
}
log "data sets: nl, load, trk ($SIZE), cut ($CUT_SIZE), lat-V1 and lat-V2 ($LAT_SIZE)"
make_set nl "$SIZE_BYTES" V1
make_set load "$SIZE_BYTES" V1
make_set trk "$SIZE_BYTES" V1
make_set cut "$CUT_BYTES" V1
make_set lat-V1 "$LAT_BYTES" V1
make_set lat-V2 "$LAT_BYTES" V2

# The iodepth-16 load: io_uring if fio and the kernel have it, else libaio.
ENGINE=libaio
if fio --name=probe --filename="$MNT/lat-V1" --size=1M --rw=randwrite --bs=4k --ioengine=io_uring --iodepth=4 \
    --output=/dev/null >/dev/null 2>&1; then
    ENGINE=io_uring
fi
log "fio engine for the iodepth-16 load: $ENGINE"

HAVE_QEMU=0
command -v qemu-storage-daemon >/dev/null && HAVE_QEMU=1

# ---------------------------------------------------------------------------------------
if want 1 6; then
# Lines 1 and 6 (no load): cp + sync, ferryfs migrate --wait, qemu mirror; interleaved, each
# from a cold page cache. Round 0 is a warm-up, not counted: in run after run the first copy
# of each kind was the slowest (cp 1.17-1.64 s against 0.77-1.12 s after it).
counted() { # KEY JSON: record a result of round 1 and later
    if ((rep > 0)); then record "$@"; fi
}
for ((rep = 0; rep <= REPEAT; rep++)); do
    rm -f "$B/plain/cp-dst.dat"
    drop_caches
    t0=$EPOCHREALTIME
    cp "$SRC" "$B/plain/cp-dst.dat"
    sync
    t1=$EPOCHREALTIME
    s=$(elapsed "$t0" "$t1")
    # The copy's own removal, as a move across file systems (cp, then rm of the source)
    # would pay it: the baseline of ferryfs's release of the source.
    rm "$B/plain/cp-dst.dat"
    sync
    t2=$EPOCHREALTIME
    rm_s=$(elapsed "$t1" "$t2")
    counted l1.cp "{\"s\":$s,\"rm_s\":$rm_s}"
    log "1. cp + sync #$rep: $(printf %.2f "$s") s (then rm + sync $(printf %.2f "$rm_s") s)"

    to=$(other /nl)
    drop_caches
    t0ms=$(now_ms)
    t0=$EPOCHREALTIME
    "$FERRY" migrate "$MNT" /nl --to "$to" --wait >"$B/l1-$rep.out"
    t1=$EPOCHREALTIME
    jid=$(awk '/^ok jobs/{print $3; exit}' "$B/l1-$rep.out")
    res=$(python3 "$PY" wait "$MNT" "$jid" 10)
    # s: to the durable switch (the data set lives on the target, the switch is in the synced
    # catalog: the `switched` event); released_s: to the job's end, once the source's tracks
    # are punched and freed too (what `--wait` waits for).
    read -r s released_s copy_s stall < <(python3 -c "
import json,sys; j=json.loads(sys.argv[1]); t0=int(sys.argv[2])
assert j['phase']=='switched', j['phase']
ev=j['events']
print((ev['switched']/1e6-t0)/1e3, (j['ended_ns']/1e6-t0)/1e3, (ev['copy-done']/1e6-t0)/1e3, j['stall_us'])" "$res" "$t0ms")
    cmd_s=$(elapsed "$t0" "$t1")
    counted l1.ferry "{\"s\":$s,\"released_s\":$released_s,\"cmd_s\":$cmd_s,\"copy_s\":$copy_s,\"stall_us\":$stall}"
    log "1. ferryfs migrate #$rep (to $to): $(printf %.2f "$s") s to the durable switch, $(printf %.2f "$released_s") s to the source freed (command $(printf %.2f "$cmd_s") s)"

    if ((HAVE_QEMU)); then
        rm -f "$B/qemu/dst.raw"
        truncate -s "$SIZE_BYTES" "$B/qemu/dst.raw"
        drop_caches
        res=$(python3 "$PY" mirror "$SRC" "$B/qemu/dst.raw" "$B/qemu" 0 0)
        counted l6.qemu "$res"
        log "6. qemu mirror #$rep: $(python3 -c "import json,sys; print('%.2f' % json.loads(sys.argv[1])['total_s'])" "$res") s"
    fi
done
rm -f "$B/plain/cp-dst.dat" "$B/qemu/dst.raw"
# The bytes survived the moves.
cmp "$SRC" "$MNT/nl" || { echo "bench-migrate: /nl differs from its source after the migrations" >&2; exit 1; }
log "1. /nl verified after $((REPEAT + 1)) migrations"

fi
# ---------------------------------------------------------------------------------------
if want 7; then
# Line 7: a sparse data set (100 x SIZE, SIZE of data in 64 runs) against the dense one of
# line 1, interleaved, each from a cold page cache; bytes checked at the end.
log "7. writing /sp: $((SIZE_BYTES * 100 >> 20)) MiB with $((SIZE_BYTES >> 20)) MiB of data"
python3 - "$SRC" "$MNT/sp" "$SIZE_BYTES" <<'PYEOF'
import os, sys
src, dst, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs, logical = 64, size * 100
piece = size // runs
with open(src, "rb") as f, open(dst, "wb") as g:
    for k in range(runs):
        f.seek(k * piece)
        g.seek(k * (logical // runs))
        g.write(f.read(piece))
    g.truncate(logical)
    os.fsync(g.fileno())
PYEOF
place /sp V1
for ((rep = 1; rep <= REPEAT; rep++)); do
    for ds in nl sp; do
        to=$(other "/$ds")
        drop_caches
        t0ms=$(now_ms)
        "$FERRY" migrate "$MNT" "/$ds" --to "$to" --wait >"$B/l7-$ds-$rep.out"
        jid=$(awk '/^ok jobs/{print $3; exit}' "$B/l7-$ds-$rep.out")
        res=$(python3 "$PY" wait "$MNT" "$jid" 10)
        s=$(python3 -c "
import json,sys; j=json.loads(sys.argv[1]); t0=int(sys.argv[2])
assert j['phase']=='switched', j['phase']
print((j['ended_ns']/1e6-t0)/1e3)" "$res" "$t0ms")
        record "l7.$ds" "{\"s\":$s}"
        log "7. migrate /$ds #$rep (to $to): $(printf %.2f "$s") s"
    done
done
python3 - "$SRC" "$MNT/sp" "$SIZE_BYTES" <<'PYEOF'
import sys
src, dst, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs, logical = 64, size * 100
piece = size // runs
with open(src, "rb") as f, open(dst, "rb") as g:
    for k in range(runs):
        f.seek(k * piece)
        g.seek(k * (logical // runs))
        assert g.read(piece) == f.read(piece), f"/sp run {k} differs after the migrations"
        if k + 1 < runs:
            assert g.read(1 << 20) == bytes(1 << 20), f"/sp hole after run {k} is not zeros"
PYEOF
log "7. /sp verified after $((REPEAT * 1)) migrations"
rm -f "$MNT/sp"
fi
# ---------------------------------------------------------------------------------------
if want 5; then
# Line 5: write throughput with a job tracking the data set, against none. The job's rate
# (64 KiB/s) keeps it in its copy phase with the monitor on, copying next to nothing.
trk_fio() { # pattern -> value
    local out=$B/trk.json
    case $1 in
    rand4k) fio --name=trk --filename="$MNT/trk" --rw=randwrite --bs=4k --ioengine=psync --size="$SIZE" \
        --fallocate=none --time_based --runtime="$TRK_RUNTIME" --ramp_time="$TRK_RAMP" \
        --output-format=json --output="$out" >/dev/null ;;
    seq1m) fio --name=trk --filename="$MNT/trk" --rw=write --bs=1M --ioengine=psync --size="$SIZE" \
        --fallocate=none --time_based --runtime="$TRK_RUNTIME" --ramp_time="$TRK_RAMP" \
        --output-format=json --output="$out" >/dev/null ;;
    esac
    python3 -c "
import json,sys; d=json.loads(sys.argv[1])['trk']; print(d['iops'] if sys.argv[2]=='rand4k' else d['mib_s'])" \
        "$(python3 "$PY" fio "$out")" "$1"
}
for ((rep = 1; rep <= TRK_REPEAT; rep++)); do
    for pat in rand4k seq1m; do
        # Alternate the order (off, on / on, off) so that a drift of the machine cancels out.
        order=(off on)
        ((rep % 2)) || order=(on off)
        for cfg in "${order[@]}"; do
            jid=
            if [[ $cfg == on ]]; then
                jid=$(start_job /trk "$(other /trk)" --rate 64K)
                ph=$(python3 "$PY" wait "$MNT" "$jid" 30 copying | python3 -c "import json,sys; print(json.load(sys.stdin)['phase'])")
                [[ $ph == copying ]] || { echo "bench-migrate: tracking job is $ph, not copying" >&2; exit 1; }
            fi
            sync
            v=$(trk_fio "$pat")
            if [[ -n $jid ]]; then
                ph=$(python3 "$PY" wait "$MNT" "$jid" 0 copying | python3 -c "import json,sys; print(json.load(sys.stdin)['phase'])")
                "$FERRY" cancel "$MNT" "$jid" >/dev/null
                python3 "$PY" wait "$MNT" "$jid" 60 >/dev/null
                [[ $ph == copying ]] || log "5. warning: the tracking job left its copy phase during the run ($ph)"
            fi
            record l5 "{\"pattern\":\"$pat\",\"config\":\"$cfg\",\"rep\":$rep,\"v\":$v}"
            log "5. $pat tracking $cfg #$rep: $v"
        done
    done
done

fi
# ---------------------------------------------------------------------------------------
if want 3; then
# Line 3: O_SYNC 4 KiB writes at a low rate on lat-V1 and lat-V2, with no job and during the
# bulk copy of /nl (which lives on one of the two volumes and moves to the other).
# fio needs a second or so to start its writers: each run gives them LAT_LEAD seconds before
# what counts (and, in the "during" runs, before the job starts).
LAT_LEAD=2
lat_fio() { # OUTPUT-PREFIX -> the fio command in LAT_CMD (a per-write latency log per writer)
    LAT_CMD=(fio --output-format=json --output="$1.json" --write_lat_log="$1" --log_avg_msec=0 --log_unix_epoch=1
        --rw=randwrite --bs=4k --ioengine=psync --sync=1 --size="$LAT_SIZE" --fallocate=none --rate_iops="$LAT_IOPS"
        --time_based --runtime=$((LAT_LEAD + LAT_RUNTIME))
        --name=lat-V1 --filename="$MNT/lat-V1" --name=lat-V2 --filename="$MNT/lat-V2")
}
for ((rep = 1; rep <= REPEAT; rep++)); do
    src=$(where /nl)
    to=$(other /nl)
    drop_caches
    t0ms=$(($(now_ms) + LAT_LEAD * 1000))
    lat_fio "$B/lat-before"
    "${LAT_CMD[@]}" >/dev/null 2>>"$B/fio.err"
    record l3 "$(python3 "$PY" lat-result "$B/lat-before" before "$t0ms" 0 "" "$src")"
    drop_caches
    lat_fio "$B/lat-during"
    "${LAT_CMD[@]}" >/dev/null 2>>"$B/fio.err" &
    fio_pid=$!
    BG_PIDS+=("$fio_pid")
    sleep "$LAT_LEAD"
    t0ms=$(now_ms)
    jid=$(start_job /nl "$to")
    wait "$fio_pid" || true
    bg_forget "$fio_pid"
    t1ms=$(now_ms)
    res=$(python3 "$PY" wait "$MNT" "$jid" 0)
    if ! python3 -c "import json,sys; sys.exit(json.loads(sys.argv[1])['phase'] in ('switched','failed','cancelled'))" "$res"; then
        # (It may switch in between: then there is nothing to cancel.)
        "$FERRY" cancel "$MNT" "$jid" >/dev/null 2>&1 || true
    fi
    python3 "$PY" wait "$MNT" "$jid" 120 >/dev/null
    record l3 "$(python3 "$PY" lat-result "$B/lat-during" during "$t0ms" "$t1ms" "$res" "$src")"
    log "3. latency #$rep: $(tail -2 "$RESULTS" | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print(r['phase'], ' '.join(f'{k} p99 {v[\"p99_us\"]} us max {v[\"max_us\"]} us n {v[\"n\"]}' for k, v in r['writers'].items()), end='; ')")"
done

fi
# ---------------------------------------------------------------------------------------
if want 4; then
# Line 4: cutovers under a steady writer (4 KiB random writes at CUT_IOPS per second).
for ((run = 1; run <= CUT_RUNS; run++)); do
    # Live: fio writes through the whole job; its per-write latency log shows the stall.
    to=$(other /cut)
    lat_log=$B/cut-$run
    fio --name=cut --filename="$MNT/cut" --rw=randwrite --bs=4k --ioengine=psync --size="$CUT_SIZE" --fallocate=none \
        --rate_iops="$CUT_IOPS" --time_based --runtime="$LOAD_TIMEOUT" --write_lat_log="$lat_log" --log_avg_msec=0 \
        --log_unix_epoch=1 --output-format=json --output="$B/cut-$run.json" >/dev/null 2>>"$B/fio.err" &
    fio_pid=$!
    BG_PIDS+=("$fio_pid")
    fio_start=$(now_ms)
    sleep 2
    t0ms=$(now_ms)
    jid=$(start_job /cut "$to")
    res=$(python3 "$PY" wait "$MNT" "$jid" "$LOAD_TIMEOUT")
    sleep 0.5
    kill -INT "$fio_pid" 2>/dev/null || true
    wait "$fio_pid" || true
    bg_forget "$fio_pid"
    r=$(python3 "$PY" live-result "$res" "${lat_log}_clat.1.log" "$fio_start" "$t0ms")
    rm -f "$lat_log"_*.log
    record l4 "$r"
    log "4. live #$run: $r"

    # Close: the writer stops and closes when the job asks for a close.
    to=$(other /cut)
    minjob=$(python3 "$PY" max-job "$MNT")
    python3 "$PY" closewriter "$MNT" /cut "$CUT_IOPS" "$minjob" "$LOAD_TIMEOUT" >"$B/close-$run.json" &
    w_pid=$!
    BG_PIDS+=("$w_pid")
    sleep 2
    exec 3<>"$MNT/.ferry/control"
    echo "migrate /cut to $to cutover=close" >&3
    read -r reply <&3
    exec 3>&-
    [[ "$reply" == "ok jobs "* ]] || { echo "bench-migrate: close-mode migrate: $reply" >&2; exit 1; }
    wait "$w_pid" || true
    bg_forget "$w_pid"
    r=$(cat "$B/close-$run.json")
    record l4 "$r"
    log "4. close #$run: $r"
done

fi
# ---------------------------------------------------------------------------------------
if want 2 6; then
# Line 2 (and 6 under load): fio random 4 KiB writes, iodepth 16, on the data set being moved.
load_fio() { # OUTPUT-PREFIX TARGET-ARGS... -> the fio command in LOAD_CMD
    local out=$1
    shift
    LOAD_CMD=(fio --name=load "$@" --rw=randwrite --bs=4k --iodepth=16 --size="$SIZE" --fallocate=none
        --time_based --runtime="$LOAD_TIMEOUT" --output-format=json --output="$out.json"
        --write_bw_log="$out" --log_avg_msec=500 --log_unix_epoch=1)
}
if ((HAVE_QEMU)); then
    cp "$SRC" "$B/qemu/src-load.raw"
fi
for ((rep = 1; rep <= REPEAT; rep++)); do
    to=$(other /load)
    out=$B/load-$rep
    load_fio "$out" --filename="$MNT/load" --ioengine="$ENGINE" --direct=0
    "${LOAD_CMD[@]}" >/dev/null 2>>"$B/fio.err" &
    fio_pid=$!
    BG_PIDS+=("$fio_pid")
    fio_start=$(now_ms)
    sleep $((LOAD_RAMP + LOAD_BEFORE))
    t0ms=$(now_ms)
    jid=$(start_job /load "$to")
    res=$(python3 "$PY" wait "$MNT" "$jid" "$LOAD_TIMEOUT")
    if python3 -c "import json,sys; sys.exit(not json.loads(sys.argv[1])['timed_out'])" "$res"; then
        log "2. job $jid did not end within $LOAD_TIMEOUT s; cancelling it"
        "$FERRY" cancel "$MNT" "$jid" >/dev/null || true
        python3 "$PY" wait "$MNT" "$jid" 120 >/dev/null
    fi
    sleep "$LOAD_AFTER"
    kill -INT "$fio_pid" 2>/dev/null || true
    wait "$fio_pid" || true
    bg_forget "$fio_pid"
    r=$(python3 "$PY" load-result "$res" "$out.json" "${out}_bw.1.log" "$fio_start" "$t0ms" "$LOAD_RAMP")
    record l2.ferry "$r"
    log "2. ferryfs under load #$rep: $r"

    if ((HAVE_QEMU)); then
        rm -f "$B/qemu/dst.raw"
        truncate -s "$SIZE_BYTES" "$B/qemu/dst.raw"
        qout=$B/qload-$rep
        load_fio "$qout" --ioengine=nbd --uri="nbd+unix:///src?socket=$B/qemu/nbd.sock"
        # (fio's nbd engine needs libnbd; without it this part of line 6 is skipped.)
        if m=$(python3 "$PY" mirror "$B/qemu/src-load.raw" "$B/qemu/dst.raw" "$B/qemu" $((LOAD_RAMP + LOAD_BEFORE)) \
            "$LOAD_AFTER" "${LOAD_CMD[@]}") && [[ -s "$qout.json" ]]; then
            r=$(python3 "$PY" qemu-load-result "$m" "$qout.json" "${qout}_bw.1.log" "$LOAD_RAMP")
            record l6.qemu_load "$r"
            log "6. qemu mirror under load #$rep: $r"
        else
            log "6. qemu mirror under load #$rep failed (see $B/qemu/daemon.log); skipped"
        fi
    fi
done

fi
# ---------------------------------------------------------------------------------------
"$FERRY" umount "$MNT" >/dev/null
fsck=$("$FERRY" fsck "$POOL" 2>&1 | tail -1)
fstype=$(df -T "$B" | awk 'NR==2{print $2}')
meta=$(printf '{"size":"%s","size_mib":%s,"repeat":%s,"fstype":"%s","dir":"%s","engine":"%s","rev":"%s","cut_size":"%s","cut_iops":%s}' \
    "$SIZE" "$((SIZE_BYTES >> 20))" "$REPEAT" "$fstype" "$BASE" "$ENGINE" "$REV" "$CUT_SIZE" "$CUT_IOPS")
python3 "$PY" report "$RESULTS" "$meta"
echo
echo "pool after the run: $fsck"
echo "machine: $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB memory, load average $(cut -d' ' -f1-3 /proc/loadavg)"
