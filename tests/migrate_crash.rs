//! Crash tests of migrations: SIGKILL of the daemon while data sets move between volumes
//! and applications keep writing.
//!
//! Each round builds a fresh pool, starts logged block writers on its data sets, starts a
//! live or close-mode migrate (rate-limited, so that it spans time) or a merge or drain
//! plan, and kills the daemon at a random point: when the job reaches a phase picked at
//! random (copying, resyncing, awaiting-close, cutover, switched), or after a random delay.
//! Then it mounts again and checks the crash semantics:
//!
//! - every acknowledged write is there (a write in flight at the kill may show its new
//!   bytes, or some of them);
//! - a migrate that had not switched resumed from its checkpoint under its own id (a
//!   "resumed at P % (from checkpoint)" event) or, with no checkpoint yet, was rolled back
//!   and started again as a new job (a "resumed as job" event); either ends switched with
//!   the data set on the target; one that had switched is not started again and its data
//!   set is on the target;
//! - a plan carries on and ends done, with its sources empty;
//! - no reservation leaks: every volume's used tracks are exactly the tracks of the data
//!   sets' extents on it;
//! - `ferryfs fsck` is clean after the remount and after the final unmount.
//!
//! `FERRYFS_TEST_SEED` repeats a run; `FERRYFS_CRASH_ROUNDS` sets the number of rounds.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::jobs::{self, control, events, reply_jobs, reply_plan, status, LoggedFile, Writers, JOB_LIMIT};
use common::{fsck_clean, ls_json_at, volume_list_json, Mounted, Rng, TestPool};
use ferryfs::failpoint;

/// Small tracks: a data set spans many of them, so re-sync passes have work to do.
const TRACK_SIZE: &str = "16K";
/// Three volumes, each able to hold all the data, so every migrate, merge and drain fits.
const VOLUMES: &[(&str, &str)] = &[("V1", "8M"), ("V2", "8M"), ("V3", "8M")];
/// The data sets: name, block size, blocks, writer threads. The first is larger than the
/// dirty set a job accepts for its cutover (1 MiB), so busy writers force re-sync passes;
/// the second has blocks that straddle tracks; the third has whole-track blocks.
const FILES: &[(&str, usize, u64, usize)] = &[("d/f0", 4096, 320, 2), ("d/f1", 5000, 120, 1), ("d/f2", 16384, 24, 1)];
/// Kill rounds of the main test, unless `FERRYFS_CRASH_ROUNDS` says otherwise.
const DEFAULT_ROUNDS: usize = 12;

// ---------------------------------------------------------------------------------------
// Set-up and checks

fn rounds_from_env() -> usize {
    std::env::var("FERRYFS_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_ROUNDS)
}

/// The last lines of the pool's mount.log, for failure messages.
fn log_tail(pool: &Path, lines: usize) -> String {
    let text = fs::read_to_string(pool.join("mount.log")).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Creates the data sets (each block written once and fsync'ed).
fn create_files(m: &Mounted, tag_base: u32) -> Vec<Arc<LoggedFile>> {
    fs::create_dir_all(m.p("d")).expect("mkdir d");
    FILES
        .iter()
        .enumerate()
        .map(|(i, (name, bs, blocks, _))| LoggedFile::create(&m.p(name), tag_base + i as u32, *bs, *blocks))
        .collect()
}

/// Starts the writers of each data set, and returns once every writer thread has had a
/// write acknowledged (so each holds its handle before anything else happens).
fn start_writers(files: &[Arc<LoggedFile>], seed: u64) -> Vec<Writers> {
    // Per data set and writer thread (thread k owns the blocks b with b % threads == k):
    // the sum of the blocks' acknowledged write numbers, which each write raises.
    let progress = |f: &LoggedFile, threads: u64, k: u64| -> u64 {
        f.blocks
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(b, _)| *b as u64 % threads == k)
            .map(|(_, s)| s.acked)
            .sum()
    };
    let before: Vec<Vec<u64>> = files
        .iter()
        .zip(FILES)
        .map(|(f, spec)| (0..spec.3 as u64).map(|k| progress(f, spec.3 as u64, k)).collect())
        .collect();
    let writers: Vec<Writers> = files
        .iter()
        .zip(FILES)
        .enumerate()
        .map(|(i, (f, spec))| Writers::start(f, spec.3, seed ^ (i as u64) << 40))
        .collect();
    let t0 = Instant::now();
    for ((f, spec), before) in files.iter().zip(FILES).zip(&before) {
        let threads = spec.3 as u64;
        while (0..threads).any(|k| progress(f, threads, k) == before[k as usize]) {
            assert!(t0.elapsed() < JOB_LIMIT, "the writers of {} never got going", f.path.display());
            thread::sleep(Duration::from_millis(1));
        }
    }
    writers
}

fn stop_writers(w: Vec<Writers>) -> u64 {
    w.into_iter().map(Writers::stop).sum()
}

/// Every block holds its last acknowledged write (or, with `allow_inflight`, all or part of
/// one that was in flight); panics with the problems, the pool's events and its log.
fn verify(m: &Mounted, files: &[Arc<LoggedFile>], allow_inflight: bool, when: &str) {
    let mut problems = Vec::new();
    for f in files {
        problems.extend(f.verify_at(&f.path, allow_inflight));
    }
    if !problems.is_empty() {
        panic!(
            "{when}: acknowledged writes lost:\n{}\nstatus:\n{:#}\nevents:\n{}\nmount.log (end):\n{}",
            problems.join("\n"),
            status(&m.mnt),
            events(&m.mnt),
            log_tail(m.pool(), 60)
        );
    }
}

/// After a verified crash: writes every block that was in flight again, on the new mount,
/// so that the log knows exactly what each block holds.
fn settle(files: &[Arc<LoggedFile>]) {
    for f in files {
        let pending: Vec<u64> = f
            .blocks
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.inflight.is_some())
            .map(|(b, _)| b as u64)
            .collect();
        if pending.is_empty() {
            continue;
        }
        let h = OpenOptions::new().read(true).write(true).open(&f.path).expect("open a data set after the remount");
        for b in pending {
            f.write_block(&h, b).expect("rewrite of a block in flight at the kill");
        }
    }
}

/// Per volume: tracks used, and tracks held by the data sets' extents (each inode once).
fn usage(target: &Path) -> (BTreeMap<String, u64>, BTreeMap<String, u64>, Value) {
    let vols = volume_list_json(target);
    let (held, ls) = jobs::held_tracks(target);
    let used = vols["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v["tracks_used"].as_u64().unwrap()))
        .collect();
    (used, held, ls)
}

/// No reservation leaks: with no job running, each volume's used tracks are exactly the
/// tracks of the data sets' extents on it. `target` is a mountpoint or a pool.
fn assert_no_leak(target: &Path, pool: &Path, when: &str) {
    let (used, held, ls) = usage(target);
    for (vol, n) in &used {
        let h = held.get(vol).copied().unwrap_or(0);
        assert_eq!(
            *n,
            h,
            "{when}: volume {vol} has {n} tracks in use but the data sets' extents on it hold {h} \
             (a leaked or lost reservation)\nls:\n{ls:#}\nvolume list:\n{:#}\nmount.log (end):\n{}",
            volume_list_json(target),
            log_tail(pool, 60)
        );
    }
}

/// The volumes a data set's extents are on.
fn volumes_of(target: &Path, path: &str) -> BTreeSet<String> {
    jobs::placement(target, path).0.into_iter().collect()
}

/// Tracks allocated to a data set.
fn tracks_of(target: &Path, path: &str) -> u64 {
    common::data_set(target, path)["allocated_tracks"].as_u64().unwrap()
}

fn free_tracks(target: &Path) -> BTreeMap<String, u64> {
    volume_list_json(target)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v["tracks_free"].as_u64().unwrap()))
        .collect()
}

fn used_tracks(target: &Path) -> BTreeMap<String, u64> {
    usage(target).0
}

// ---------------------------------------------------------------------------------------
// What a round does

#[derive(Clone, Debug)]
enum Scenario {
    /// `migrate PATHS to TARGETS cutover=.. rate=..`
    Migrate { paths: Vec<String>, to: Vec<String>, close: bool, rate: u64 },
    /// `merge SOURCE into INTO` or `drain SOURCE`; `moved`: the data sets on SOURCE.
    Plan { merge: bool, source: String, into: String, moved: Vec<String>, close: bool, rate: u64 },
}

impl Scenario {
    fn close(&self) -> bool {
        match self {
            Scenario::Migrate { close, .. } | Scenario::Plan { close, .. } => *close,
        }
    }

    fn line(&self) -> String {
        let opts = |close: bool, rate: u64| format!("cutover={} rate={rate}", if close { "close" } else { "live" });
        match self {
            Scenario::Migrate { paths, to, close, rate } => {
                format!("migrate {} to {} {}", paths.join(" "), to.join(","), opts(*close, *rate))
            }
            Scenario::Plan { merge: true, source, into, close, rate, .. } => {
                format!("merge {source} into {into} {}", opts(*close, *rate))
            }
            Scenario::Plan { merge: false, source, close, rate, .. } => {
                format!("drain {source} {}", opts(*close, *rate))
            }
        }
    }
}

/// Where the kill lands.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// As soon as a watched job is in this phase or beyond.
    Phase(&'static str),
    /// After this long.
    Delay(Duration),
}

fn rank(phase: &str) -> u32 {
    match phase {
        "queued" => 0,
        "assessing" => 1,
        "allocating" => 2,
        "copying" => 3,
        "resyncing" => 4,
        "awaiting-close" => 5,
        "cutover" => 6,
        "switched" => 7,
        _ => 99,
    }
}

/// Picks a migrate or a plan that fits the pool as it is.
fn pick_scenario(m: &Mounted, kind: u64, rng: &mut Rng) -> Scenario {
    let close = rng.below(2) == 0;
    let rate = *rng.pick(&[2u64 << 20, 4 << 20, 8 << 20]);
    let names: Vec<String> = ["V1", "V2", "V3"].iter().map(|s| s.to_string()).collect();
    let free = free_tracks(&m.mnt);
    let used = used_tracks(&m.mnt);
    match kind {
        0 | 1 => {
            // One or two data sets, to a volume (or two) they are not on, if any.
            let mut paths: Vec<String> = FILES.iter().map(|f| format!("/{}", f.0)).collect();
            let k = 1 + rng.below(2) as usize;
            while paths.len() > k {
                let i = rng.below(paths.len() as u64) as usize;
                paths.remove(i);
            }
            let need: u64 = paths.iter().map(|p| tracks_of(&m.mnt, p)).sum();
            let on: BTreeSet<String> = paths.iter().flat_map(|p| volumes_of(&m.mnt, p)).collect();
            let mut fits: Vec<String> = names.iter().filter(|v| free[*v] >= need).cloned().collect();
            let away: Vec<String> = fits.iter().filter(|v| !on.contains(*v)).cloned().collect();
            if !away.is_empty() {
                fits = away;
            }
            assert!(!fits.is_empty(), "no volume holds {need} tracks: {free:?}");
            let first = rng.pick(&fits).clone();
            let mut to = vec![first.clone()];
            if fits.len() > 1 && rng.below(4) == 0 {
                to.push(fits.iter().find(|v| **v != first).unwrap().clone());
            }
            Scenario::Migrate { paths, to, close, rate }
        }
        _ => {
            // Empty the fullest volume: into another one (merge) or onto the rest (drain).
            // First the data sets that are elsewhere move onto it (at full speed, before the
            // writers start), so the plan has several jobs and one of them waits its turn.
            let source = names.iter().max_by_key(|v| used[*v]).unwrap().clone();
            let elsewhere: Vec<String> = FILES
                .iter()
                .map(|f| format!("/{}", f.0))
                .filter(|p| !volumes_of(&m.mnt, p).contains(&source))
                .collect();
            if !elsewhere.is_empty() {
                let line = format!("migrate {} to {source}", elsewhere.join(" "));
                let reply = control(&m.mnt, &line).unwrap_or_else(|e| panic!("`{line}` refused: {e}"));
                jobs::wait_switched(&m.mnt, &reply_jobs(&reply));
            }
            let free = free_tracks(&m.mnt);
            let merge = kind == 2;
            let ls = ls_json_at(&m.mnt, "/");
            let on_source: Vec<&Value> = ls["data_sets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["volumes"].as_array().unwrap().iter().any(|v| *v == source.as_str()))
                .collect();
            let need: u64 = on_source.iter().map(|d| d["allocated_tracks"].as_u64().unwrap()).sum();
            let moved = on_source.iter().map(|d| d["path"].as_str().unwrap().to_string()).collect();
            let into = names
                .iter()
                .filter(|v| **v != source && free[*v] >= need)
                .max_by_key(|v| free[*v])
                .cloned()
                .unwrap_or_else(|| panic!("no volume holds the {need} tracks on {source}: {free:?}"));
            Scenario::Plan { merge, source, into, moved, close, rate }
        }
    }
}

fn pick_kill(close: bool, rng: &mut Rng) -> KillAt {
    let mut phases: Vec<&'static str> = vec!["copying", "resyncing", "cutover", "switched"];
    if close {
        phases.push("awaiting-close");
    }
    if rng.below(3) == 0 {
        KillAt::Delay(Duration::from_millis(rng.below(1500)))
    } else {
        KillAt::Phase(phases[rng.below(phases.len() as u64) as usize])
    }
}

/// What the test started: job ids (of a migrate), or a plan id.
#[derive(Clone, Debug)]
enum Started {
    Jobs(Vec<u64>),
    Plan(u64),
}

fn start(m: &Mounted, sc: &Scenario) -> Started {
    let line = sc.line();
    let reply = control(&m.mnt, &line).unwrap_or_else(|e| panic!("`{line}` refused: {e}\n{:#}", status(&m.mnt)));
    match sc {
        Scenario::Migrate { paths, .. } => {
            let ids = reply_jobs(&reply);
            assert_eq!(ids.len(), paths.len(), "`{line}`: one job per data set expected: {reply}");
            Started::Jobs(ids)
        }
        Scenario::Plan { .. } => Started::Plan(reply_plan(&reply).unwrap_or_else(|| panic!("`{line}`: {reply}"))),
    }
}

/// The watched jobs' reports, and whether everything the test started has ended.
fn watched(st: &Value, started: &Started) -> (Vec<Value>, bool) {
    let all = st["jobs"].as_array().unwrap();
    let ids: Vec<u64> = match started {
        Started::Jobs(ids) => ids.clone(),
        Started::Plan(p) => st["plans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == *p)
            .map(|x| x["jobs"].as_array().unwrap().iter().map(|j| j.as_u64().unwrap()).collect())
            .unwrap_or_default(),
    };
    let jobs: Vec<Value> = ids.iter().filter_map(|id| all.iter().find(|j| j["id"] == *id).cloned()).collect();
    let done = match started {
        Started::Jobs(_) => jobs.iter().all(|j| j["phase"].as_str().is_some_and(jobs::is_final)),
        Started::Plan(p) => st["plans"].as_array().unwrap().iter().any(|x| x["id"] == *p && x["phase"] != "running"),
    };
    (jobs, done)
}

/// Runs until the kill point, then kills the daemon. In close mode the writers are stopped
/// (their handles closed) a little after a job starts waiting for the close, unless the
/// kill is meant to land while it waits. Returns where the kill landed, the writes the
/// writers stopped early acknowledged, and the data sets of the jobs seen switched.
fn run_to_kill(
    m: Mounted,
    started: &Started,
    close: bool,
    kill: KillAt,
    writers: &mut Option<Vec<Writers>>,
    rng: &mut Rng,
) -> (String, u64, BTreeSet<String>) {
    let t0 = Instant::now();
    let mut switched = BTreeSet::new();
    let linger = Duration::from_millis(rng.below(150));
    let mut awaiting_since: Option<Instant> = None;
    let mut early_writes = 0;
    loop {
        let st = status(&m.mnt);
        let (jobs, done) = watched(&st, started);
        switched
            .extend(jobs.iter().filter(|j| j["phase"] == "switched").map(|j| j["path"].as_str().unwrap().to_string()));
        if let Some(bad) = jobs.iter().find(|j| matches!(j["phase"].as_str(), Some("failed" | "cancelled" | "stopped")))
        {
            panic!("a job ended badly before the kill: {bad:#}\nstatus:\n{st:#}\nevents:\n{}", events(&m.mnt));
        }
        let furthest = jobs.iter().map(|j| j["phase"].as_str().unwrap_or("")).max_by_key(|p| rank(p)).unwrap_or("");
        let describe = |why: &str| {
            let phases: Vec<String> =
                jobs.iter().map(|j| format!("{}:{}", j["id"], j["phase"].as_str().unwrap())).collect();
            format!("{why} after {} ms, jobs [{}]", t0.elapsed().as_millis(), phases.join(" "))
        };
        let hit = match kill {
            KillAt::Phase(p) => !jobs.is_empty() && rank(furthest) >= rank(p) && rank(furthest) < 99,
            KillAt::Delay(d) => t0.elapsed() >= d,
        };
        if hit || done {
            let what = describe(if hit { "kill point reached" } else { "everything ended before the kill point" });
            m.kill9();
            return (what, early_writes, switched);
        }
        let wants_window = !matches!(kill, KillAt::Phase("awaiting-close"));
        if close && wants_window && writers.is_some() && jobs.iter().any(|j| j["phase"] == "awaiting-close") {
            let since = *awaiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= linger {
                early_writes += stop_writers(writers.take().unwrap());
            }
        }
        assert!(
            t0.elapsed() < JOB_LIMIT,
            "the kill point {kill:?} was never reached:\n{st:#}\nevents:\n{}",
            events(&m.mnt)
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until everything the new mount runs has ended; asserts it all switched, and the
/// recorded plans ended done. Returns the final job reports.
fn wait_all_switched(m: &Mounted, when: &str) -> Vec<Value> {
    let t0 = Instant::now();
    loop {
        let st = status(&m.mnt);
        let jobs = st["jobs"].as_array().unwrap().clone();
        let plans = st["plans"].as_array().unwrap().clone();
        let jobs_done = jobs.iter().all(|j| j["phase"].as_str().is_some_and(jobs::is_final));
        let plans_done = plans.iter().all(|p| p["phase"] != "running");
        if jobs_done && plans_done {
            for j in &jobs {
                assert_eq!(
                    j["phase"],
                    "switched",
                    "{when}: a job did not switch: {j:#}\nevents:\n{}\nmount.log (end):\n{}",
                    events(&m.mnt),
                    log_tail(m.pool(), 60)
                );
            }
            for p in &plans {
                assert_eq!(
                    p["phase"],
                    "done",
                    "{when}: a plan did not end done: {p:#}\nevents:\n{}\nmount.log (end):\n{}",
                    events(&m.mnt),
                    log_tail(m.pool(), 60)
                );
            }
            return jobs;
        }
        assert!(t0.elapsed() < JOB_LIMIT, "{when}: jobs did not end:\n{st:#}\nevents:\n{}", events(&m.mnt));
        thread::sleep(Duration::from_millis(20));
    }
}

/// The crash semantics after the remount and once everything ended: where each data set
/// is, and which jobs were started again (none for the data sets in `switched`, whose jobs
/// were seen switched before the kill). `recrashed`: the daemon was killed a second time,
/// while the first recovery's jobs ran.
fn check_outcome(
    m: &Mounted,
    sc: &Scenario,
    started: &Started,
    switched: &BTreeSet<String>,
    recrashed: bool,
    after: &[Value],
    when: &str,
) {
    let ev = events(&m.mnt);
    let ctx = || format!("status:\n{:#}\nevents:\n{ev}\nmount.log (end):\n{}", status(&m.mnt), log_tail(m.pool(), 60));
    for j in after {
        let path = j["path"].as_str().unwrap();
        assert!(
            !switched.contains(path),
            "{when}: {path} switched before the kill, yet the remount copied it again: {j:#}\n{}",
            ctx()
        );
    }
    match (sc, started) {
        (Scenario::Migrate { paths, to, .. }, Started::Jobs(ids)) => {
            for (path, old) in paths.iter().zip(ids) {
                let again: Vec<&Value> = after.iter().filter(|j| j["path"] == path.as_str()).collect();
                assert!(again.len() <= 1, "{when}: {path} was started again more than once\n{}", ctx());
                if let Some(j) = again.first() {
                    let new = j["id"].as_u64().unwrap();
                    if ev.contains(&format!("job {new} resumed at ")) {
                        // Resumed from its checkpoint, under its own id (or, after a second
                        // crash, that of the job the mount between started again).
                        let line = format!("job {new} resumed at ");
                        assert!(recrashed || new == *old, "{when}: {path} resumed as job {new}, not {old}\n{}", ctx());
                        assert!(ev.contains("(from checkpoint)"), "{when}: no `{line}` event\n{}", ctx());
                    } else {
                        // Rolled back (no checkpoint yet) and started from the beginning as
                        // a new job. After a second crash it is the job of the mount between
                        // that resumed.
                        let line = format!("resumed as job {new} path={path}");
                        let first = format!("job {old} {line}");
                        let found = if recrashed { ev.contains(&line) } else { ev.contains(&first) };
                        assert!(found, "{when}: no `{}` event\n{}", if recrashed { &line } else { &first }, ctx());
                    }
                    assert!(j["plan"].is_null(), "{when}: the resumed job of {path} belongs to a plan: {j:#}");
                }
                // Either way the data set ends whole on the target.
                let on = volumes_of(&m.mnt, path);
                let want: BTreeSet<String> = to.iter().cloned().collect();
                assert!(
                    !on.is_empty() && on.is_subset(&want),
                    "{when}: {path} is on {on:?}, expected only the target {want:?} (job {old} neither \
                     resumed to completion nor switched before the kill)\n{}",
                    ctx()
                );
            }
        }
        (Scenario::Plan { merge, source, into, moved, .. }, Started::Plan(p)) => {
            if !after.is_empty() || status(&m.mnt)["plans"].as_array().unwrap().iter().any(|x| x["id"] == *p) {
                let line = format!("plan {p} resumed");
                assert!(ev.contains(&line), "{when}: no `{line}` event\n{}", ctx());
            }
            // The plan ends with its source empty.
            let used = used_tracks(&m.mnt);
            assert_eq!(used[source], 0, "{when}: the plan's source {source} is not empty\n{}", ctx());
            let ls = ls_json_at(&m.mnt, "/");
            for d in ls["data_sets"].as_array().unwrap() {
                let vols: BTreeSet<&str> =
                    d["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
                assert!(!vols.contains(source.as_str()), "{when}: {} is still on {source}\n{}", d["path"], ctx());
            }
            if *merge {
                // A merge moves each data set on its source whole into its target.
                for path in moved {
                    let on = volumes_of(&m.mnt, path);
                    assert_eq!(
                        on,
                        BTreeSet::from([into.clone()]),
                        "{when}: {path} was on {source} and should now be whole on {into}\n{}",
                        ctx()
                    );
                }
            }
            for j in after {
                assert_eq!(j["plan"].as_u64(), Some(*p), "{when}: a job outside the plan ran: {j:#}\n{}", ctx());
            }
        }
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------------------------------
// Tests

/// Rounds of: fresh pool, writers, a migrate or a plan, SIGKILL at a random point, remount,
/// and every check of the crash semantics.
#[test]
fn kill9_during_migrations_loses_nothing_and_resumes() {
    let seed = common::seed_from_env("migrate_crash");
    let rounds = rounds_from_env();
    let mut rng = Rng::new(seed);
    for round in 0..rounds {
        let mut rr = Rng::new(seed ^ (round as u64 + 1).wrapping_mul(0x51_7CC1_B727_220A));
        // Every kind comes up in the first rounds, then at random.
        let kind = if round < 4 { round as u64 } else { rng.below(4) };
        let tp = TestPool::new(TRACK_SIZE, VOLUMES);
        // Every other round the copiers checkpoint every 50 ms, so that the kills (mostly in
        // a job's first second) find checkpoints to resume from; the others mostly roll back.
        let ck: &[(&str, &str)] = if round % 2 == 0 { &[(failpoint::ENV, "checkpoint-interval=50ms")] } else { &[] };
        let m = tp.mount_env(ck);
        let files = create_files(&m, 16 * round as u32);
        let sc = pick_scenario(&m, kind, &mut rr);
        let kill = pick_kill(sc.close(), &mut rr);
        let mut writers = Some(start_writers(&files, rr.next()));
        // Let the writers get going, so the copy races them from the start.
        thread::sleep(Duration::from_millis(rr.below(100)));
        let started = start(&m, &sc);
        let pool = m.pool().to_path_buf();
        let (landed, early, switched) = run_to_kill(m, &started, sc.close(), kill, &mut writers, &mut rr);
        let writes = early + writers.take().map(stop_writers).unwrap_or(0);
        eprintln!("round {round}: `{}` ({started:?}), kill at {kill:?}: {landed}; {writes} writes", sc.line());

        let mut m = tp.mount_env(ck);
        fsck_clean(&pool);
        let resumed: Vec<String> = events(&m.mnt)
            .lines()
            .filter(|l| l.contains("(from checkpoint)"))
            .filter_map(|l| Some(l.split_once(" job ")?.1.split(" path=").next()?.to_string()))
            .collect();
        if !resumed.is_empty() {
            eprintln!("round {round}: resumed from checkpoints: {}", resumed.join("; "));
        }
        let mut when = format!("round {round} (`{}`, kill at {kill:?}: {landed})", sc.line());
        verify(&m, &files, true, &format!("{when}, after the remount"));
        settle(&files);
        // Sometimes the daemon dies again while the rolled-back work starts over.
        let recrashed = rr.below(3) == 0;
        if recrashed {
            let w = start_writers(&files, rr.next());
            let delay = Duration::from_millis(rr.below(600));
            thread::sleep(delay);
            let st = status(&m.mnt);
            m.kill9();
            stop_writers(w);
            let phases: Vec<String> = st["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| format!("{}:{}", j["id"], j["phase"].as_str().unwrap()))
                .collect();
            eprintln!("round {round}: killed again {delay:?} into the recovery, jobs [{}]", phases.join(" "));
            when = format!("{when}, killed again {delay:?} into the recovery (jobs [{}])", phases.join(" "));
            m = tp.mount_env(ck);
            fsck_clean(&pool);
            verify(&m, &files, true, &format!("{when}, after the second remount"));
            settle(&files);
        }
        // The applications go on writing while the rolled-back work starts again; in close
        // mode they stop after a while, so that the cutover can happen.
        let w = start_writers(&files, rr.next());
        thread::sleep(Duration::from_millis(200 + rr.below(600)));
        stop_writers(w);
        let after = wait_all_switched(&m, &when);
        check_outcome(&m, &sc, &started, &switched, recrashed, &after, &when);
        verify(&m, &files, false, &format!("{when}, once the jobs ended"));
        assert_no_leak(&m.mnt, &pool, &format!("{when}, once the jobs ended"));
        m.unmount();
        fsck_clean(&pool);
        assert_no_leak(&pool, &pool, &format!("{when}, after the unmount"));
    }
}

/// Close mode: SIGKILL inside the downtime window (phase cutover, opens held). The window
/// lasts a tenth of a millisecond, so the mount is started with a pause in it
/// (`FERRYFS_PAUSE=close-window=..`, src/failpoint.rs): the job sleeps in the open window,
/// before its final re-sync. An opener thread opens the data set again and again; the kill
/// lands while one of its opens is held by the window, and that open must then fail (not
/// hang). The remount must find every acknowledged write, the job rolled back and started
/// again, and nothing leaked.
#[test]
fn kill9_in_close_mode_downtime_window() {
    const KILLS: usize = 3;
    let seed = common::seed_from_env("migrate_crash");
    let mut rng = Rng::new(seed ^ 0xC105_E000);
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let pause = [(failpoint::ENV, "close-window=500ms")];
    let mut m = tp.mount_env(&pause);
    let files = create_files(&m, 900);
    let path = format!("/{}", FILES[0].0);
    for attempt in 0..KILLS {
        let on = volumes_of(&m.mnt, &path);
        let target = ["V1", "V2", "V3"].iter().find(|v| !on.contains(**v)).unwrap().to_string();
        let writers = start_writers(&files[..1], rng.next());
        let line = format!("migrate {path} to {target} cutover=close");
        let ids = reply_jobs(&control(&m.mnt, &line).unwrap_or_else(|e| panic!("`{line}`: {e}")));
        let id = ids[0];
        jobs::wait_phase(&m.mnt, id, "awaiting-close");
        // Writes go on a little longer, so that the window has a dirty set to copy.
        thread::sleep(Duration::from_millis(20 + rng.below(80)));
        // Once the writers' handles are closed, an opener opens the data set again and
        // again (an open waits while the window is open), noting when the open it is in
        // started, and how its last one went, until told to stop or an open fails.
        let go = Arc::new(AtomicBool::new(true));
        let opener_state = Arc::new(Mutex::new(Opener::default()));
        stop_writers(writers);
        let opener = {
            let (go, st, p) = (go.clone(), opener_state.clone(), files[0].path.clone());
            thread::spawn(move || {
                while go.load(Ordering::Acquire) {
                    let t = Instant::now();
                    st.lock().unwrap().in_open_since = Some(t);
                    let r = OpenOptions::new().read(true).open(&p);
                    let ok = r.is_ok();
                    // Noted before the handle is closed: the window can only open once it
                    // is, so an open noted as in progress when the window is seen open is
                    // one the window holds.
                    let mut s = st.lock().unwrap();
                    s.in_open_since = None;
                    s.last = Some((t, Instant::now(), ok));
                    drop(s);
                    drop(r);
                    if !ok {
                        return;
                    }
                    thread::sleep(Duration::from_micros(300));
                }
            })
        };
        // The kill goes in once the job sleeps in its open window and the opener is in an
        // open (which the window holds: no handle can be open while it is).
        let paused = format!("job {id} pause point=close-window");
        let t0 = Instant::now();
        loop {
            let held = opener_state.lock().unwrap().in_open_since.is_some();
            if held && events(&m.mnt).contains(&paused) {
                break;
            }
            let j = jobs::job(&m.mnt, id);
            assert!(
                !j["phase"].as_str().is_some_and(jobs::is_final),
                "job {id} ended without pausing in its window: {j:#}\nevents:\n{}",
                events(&m.mnt)
            );
            assert!(t0.elapsed() < JOB_LIMIT, "job {id} never opened its window: {j:#}");
            thread::sleep(Duration::from_millis(1));
        }
        let killed_at = Instant::now();
        let pool = m.pool().to_path_buf();
        m.kill9();
        go.store(false, Ordering::Release);
        let t = Instant::now();
        while !opener.is_finished() && t.elapsed() < Duration::from_secs(30) {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(opener.is_finished(), "an open held by the downtime window never returned after the kill");
        opener.join().expect("opener thread");
        let (started, returned, ok) = opener_state.lock().unwrap().last.expect("the opener opened");
        assert!(
            started < killed_at && returned > killed_at && !ok,
            "attempt {attempt}: the open the window held should have failed with the kill \
             (it started {:?} before the kill, returned {:?} after it, ok={ok})",
            killed_at.saturating_duration_since(started),
            returned.saturating_duration_since(killed_at)
        );
        eprintln!(
            "attempt {attempt}: killed in the downtime window of job {id}, {} us into a held open",
            (killed_at - started).as_micros()
        );

        m = tp.mount_env(&pause);
        fsck_clean(&pool);
        let when = format!("attempt {attempt}: kill in the close-mode downtime window of job {id}");
        verify(&m, &files, true, &when);
        settle(&files);
        let after = wait_all_switched(&m, &when);
        // Killed before its switch: the job was rolled back and started again.
        assert!(after.iter().any(|j| j["path"] == path.as_str()), "{when}: the job was not started again");
        let sc = Scenario::Migrate { paths: vec![path.clone()], to: vec![target.clone()], close: true, rate: 0 };
        check_outcome(&m, &sc, &Started::Jobs(ids.clone()), &BTreeSet::new(), false, &after, &when);
        verify(&m, &files, false, &format!("{when}, once the job ended"));
        assert_no_leak(&m.mnt, &pool, &format!("{when}, once the job ended"));
    }
    m.unmount();
    fsck_clean(&tp.pool);
    assert_no_leak(&tp.pool, &tp.pool, "after the unmount");
}

/// Live mode: SIGKILL while the cutover holds the data set's writes, before its final
/// re-sync (`FERRYFS_PAUSE=live-hold=..` keeps the hold on). While it is on, the held data
/// set's writers get no write acknowledged and another data set's writers go on. After the
/// remount every acknowledged write is there, and the job was rolled back and started again.
#[test]
fn kill9_while_a_live_cutover_holds_the_writes() {
    let seed = common::seed_from_env("migrate_crash");
    let mut rng = Rng::new(seed ^ 0x11FE_4010);
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let m = tp.mount_env(&[(failpoint::ENV, "live-hold=20s")]);
    let files = create_files(&m, 950);
    let path = format!("/{}", FILES[0].0);
    let on = volumes_of(&m.mnt, &path);
    let target = ["V1", "V2", "V3"].iter().find(|v| !on.contains(**v)).unwrap().to_string();
    let writers = start_writers(&files, rng.next());
    let line = format!("migrate {path} to {target} cutover=live");
    let ids = reply_jobs(&control(&m.mnt, &line).unwrap_or_else(|e| panic!("`{line}`: {e}")));
    let id = ids[0];
    let paused = format!("job {id} pause point=live-hold");
    let t0 = Instant::now();
    while !events(&m.mnt).contains(&paused) {
        let j = jobs::job(&m.mnt, id);
        assert!(!j["phase"].as_str().is_some_and(jobs::is_final), "job {id} ended without its hold: {j:#}");
        assert!(t0.elapsed() < JOB_LIMIT, "job {id} never reached its hold: {j:#}");
        thread::sleep(Duration::from_millis(1));
    }
    // Each count is taken once another data set's writers have had writes acknowledged and
    // a while has passed: a writer of the held data set whose last write returned just
    // before the hold, and which was then preempted before it logged the write, has long
    // since logged it. (The while is a settling time, not a measurement: a writer would
    // have to stay runnable and unscheduled through all of it for the check to misfire.)
    let others_go_on = || {
        let (t, from) = (Instant::now(), acked_writes(&files[1]));
        while acked_writes(&files[1]) < from + 20 || t.elapsed() < Duration::from_millis(300) {
            assert!(t.elapsed() < JOB_LIMIT, "the writers of another data set stalled during the hold");
            thread::sleep(Duration::from_millis(1));
        }
    };
    others_go_on();
    let held_before = acked_writes(&files[0]);
    others_go_on();
    let held_after = acked_writes(&files[0]);
    // Reads are not held: the data set reads back from the mount (not from cached pages)
    // while its writes are, and the job is still in its hold afterwards.
    let f = fs::File::open(&files[0].path).unwrap();
    // SAFETY: a valid descriptor; advice only.
    unsafe { libc::posix_fadvise(std::os::unix::io::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) };
    drop(f);
    let problems = files[0].verify_at(&files[0].path, true);
    assert!(problems.is_empty(), "read during the live hold:\n{}", problems.join("\n"));
    let j = jobs::job(&m.mnt, id);
    assert_eq!(j["phase"], "cutover", "a read waited for the hold to end: {j:#}");
    let pool = m.pool().to_path_buf();
    m.kill9();
    let writes = stop_writers(writers);
    eprintln!("killed in the live hold of job {id}; {writes} writes acknowledged in all");

    let m = tp.mount();
    fsck_clean(&pool);
    let when = format!("kill in the live hold of job {id}");
    verify(&m, &files, true, &when);
    settle(&files);
    let after = wait_all_switched(&m, &when);
    // Killed before its switch (so the hold lasted from the pause to the kill): the job was
    // rolled back and started again.
    assert!(after.iter().any(|j| j["path"] == path.as_str()), "{when}: the job was not started again");
    assert_eq!(held_before, held_after, "{when}: writes to {path} were acknowledged while the cutover held them");
    let sc = Scenario::Migrate { paths: vec![path.clone()], to: vec![target], close: false, rate: 0 };
    check_outcome(&m, &sc, &Started::Jobs(ids), &BTreeSet::new(), false, &after, &when);
    verify(&m, &files, false, &format!("{when}, once the job ended"));
    assert_no_leak(&m.mnt, &pool, &format!("{when}, once the job ended"));
    m.unmount();
    fsck_clean(&pool);
}

/// Writes acknowledged to a logged data set so far (each raises one block's number).
fn acked_writes(f: &LoggedFile) -> u64 {
    f.blocks.lock().unwrap().iter().map(|b| b.acked).sum()
}

/// The opener thread of the downtime-window test.
#[derive(Default)]
struct Opener {
    /// When the open it is in started.
    in_open_since: Option<Instant>,
    /// Its last open: started, returned, succeeded.
    last: Option<(Instant, Instant, bool)>,
}

/// SIGKILL right after a switch: the remount starts nothing again, the data set is on the
/// target, and its source tracks are free.
#[test]
fn kill9_right_after_switch_frees_the_source() {
    let seed = common::seed_from_env("migrate_crash");
    let mut rng = Rng::new(seed ^ 0x5A17_C4ED);
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let mut m = tp.mount();
    let files = create_files(&m, 700);
    for round in 0..3 {
        let f = &files[rng.below(files.len() as u64) as usize];
        let path = format!("/{}", f.path.strip_prefix(&m.mnt).unwrap().display());
        let on = volumes_of(&m.mnt, &path);
        let target = ["V1", "V2", "V3"].iter().find(|v| !on.contains(**v)).unwrap().to_string();
        let before = used_tracks(&m.mnt);
        let tracks = tracks_of(&m.mnt, &path);
        let writers = start_writers(&files, rng.next());
        let line = format!("migrate {path} to {target} rate=4M");
        let reply = control(&m.mnt, &line).unwrap_or_else(|e| panic!("`{line}`: {e}"));
        let id = reply_jobs(&reply)[0];
        let t0 = Instant::now();
        loop {
            let j = jobs::job(&m.mnt, id);
            if j["phase"] == "switched" {
                break;
            }
            assert!(
                !j["phase"].as_str().is_some_and(jobs::is_final),
                "job {id} ended without a switch: {j:#}\nevents:\n{}",
                events(&m.mnt)
            );
            assert!(t0.elapsed() < JOB_LIMIT, "job {id} never switched: {j:#}");
            thread::sleep(Duration::from_micros(500));
        }
        let pool = m.pool().to_path_buf();
        m.kill9();
        let writes = stop_writers(writers);
        eprintln!("round {round}: killed right after job {id} ({path} {on:?} -> {target}) switched; {writes} writes");

        m = tp.mount();
        fsck_clean(&pool);
        let when = format!("round {round}: kill right after the switch of job {id} ({path} -> {target})");
        verify(&m, &files, true, &when);
        settle(&files);
        let st = status(&m.mnt);
        assert!(
            st["jobs"].as_array().unwrap().is_empty(),
            "{when}: a switched job must not start again:\n{st:#}\nevents:\n{}",
            events(&m.mnt)
        );
        assert_eq!(volumes_of(&m.mnt, &path), BTreeSet::from([target.clone()]), "{when}: {path} is not on the target");
        // The source tracks are free: each source volume lost exactly what the data set
        // held there, and nothing leaked anywhere.
        let after = used_tracks(&m.mnt);
        let src_before: u64 = on.iter().map(|v| before[v]).sum();
        let src_after: u64 = on.iter().map(|v| after[v]).sum();
        assert_eq!(
            src_after + tracks,
            src_before,
            "{when}: source volumes {on:?} used {src_before} tracks before, {src_after} after; the data set \
             held {tracks}: the source was not freed\nmount.log (end):\n{}",
            log_tail(&pool, 40)
        );
        assert_no_leak(&m.mnt, &pool, &when);
    }
    m.unmount();
    fsck_clean(&tp.pool);
    assert_no_leak(&tp.pool, &tp.pool, "after the unmount");
}

/// The story: a remount right after a kill -9 failed with "Transport endpoint is not
/// connected": the dead mount's attributes were still in the kernel's cache (ten seconds),
/// so the stat that looked for a dead mount found a live one; and by then recovery had
/// rolled the running job back, and nothing started it again. Now the dead mount is found by
/// a request the kernel can't answer from its cache (statfs), and recovery queues the job
/// again in the catalog before anything else can fail.
#[test]
fn remount_right_after_kill9_finishes_the_running_job() {
    let tp = TestPool::new(TRACK_SIZE, &[("V1", "64M"), ("V2", "64M")]);
    let m = tp.mount();
    let data = common::pattern(8 << 20, 41);
    fs::write(m.p("big"), &data).unwrap();
    // The cached attributes are what hid the dead mount: make sure the root's are cached.
    let _ = fs::metadata(&m.mnt).unwrap();
    let reply = control(&m.mnt, "migrate /big to V2 rate=2M").unwrap();
    let id = reply_jobs(&reply)[0];
    let t0 = Instant::now();
    while jobs::job(&m.mnt, id)["phase"] != "copying" {
        assert!(t0.elapsed() < Duration::from_secs(30), "job {id} never started copying");
        thread::sleep(Duration::from_millis(5));
    }
    m.kill9_leave_mount();
    thread::sleep(Duration::from_millis(100));
    let m = tp.mount();
    let st = status(&m.mnt);
    let jobs: Vec<u64> = st["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_u64().unwrap()).collect();
    assert_eq!(jobs.len(), 1, "the rolled-back job is queued again: {st}");
    let done = jobs::wait_switched(&m.mnt, &jobs);
    assert_eq!(done[0]["phase"], "switched");
    common::assert_bytes_eq(&fs::read(m.p("big")).unwrap(), &data, "after the remount and the job");
    let vols: BTreeSet<String> = common::data_set(&m.mnt, "/big")["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["volume"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(vols, BTreeSet::from(["V2".to_string()]), "the data set moved");
    m.unmount();
    fsck_clean(tp.pool.as_path());
}
