//! Migration, end to end through a real mount: live and close cutovers under concurrent
//! writers, growth and truncation during a job, cancel, merge, drain, refused commands, the
//! control file's protocol and permissions, a database migrated while it takes inserts, and
//! the CLI's `--wait`.
//!
//! A job that must last long enough for a test to act during it is slowed with `rate=`; no
//! test asserts on time. Bytes are checked against what the writers were told was written
//! (tests/common/jobs.rs), after dropping the kernel's cached pages or after a remount, so
//! that they come from the volumes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use common::jobs::*;
use common::*;

// ---------------------------------------------------------------------------------------
// Helpers

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

/// Drop the kernel's cached pages of a file, so that the next read comes from the volumes.
fn drop_cache(path: &Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: fadvise on a file descriptor this test owns.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED) on {}", path.display());
}

/// A file's bytes, read from the volumes (not from cached pages).
fn read_fresh(path: &Path) -> Vec<u8> {
    drop_cache(path);
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Write a file with one allocation: every track in one request (fallocate), then its
/// bytes. (A truncate up allocates nothing: data sets are sparse.)
fn write_whole(path: &Path, data: &[u8]) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    unsafe_fallocate(&f, 0, 0, data.len() as u64).unwrap();
    f.write_all_at(data, 0).unwrap();
}

/// The write log of `lf` holds for the file at `path` (read from the volumes).
#[track_caller]
fn verify_log(lf: &LoggedFile, path: &Path, what: &str) {
    drop_cache(path);
    let problems = lf.verify_at(path, false);
    assert!(problems.is_empty(), "{what}: the write log does not verify:\n{}", problems.join("\n"));
}

/// Every write the writers started was acknowledged: a writer thread stops quietly at its
/// first error, leaving that write in flight.
#[track_caller]
fn assert_all_acked(lf: &LoggedFile) {
    let bl = lf.blocks.lock().unwrap();
    let failed: Vec<usize> = bl.iter().enumerate().filter(|(_, b)| b.inflight.is_some()).map(|(i, _)| i).collect();
    assert!(failed.is_empty(), "writes to blocks {failed:?} of {} failed", lf.path.display());
}

/// The counter of the latest acknowledged write of a logged file.
fn max_acked(lf: &LoggedFile) -> u64 {
    lf.blocks.lock().unwrap().iter().map(|b| b.acked).max().unwrap_or(0)
}

/// Wait (bounded) until `cond` holds.
#[track_caller]
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < JOB_LIMIT, "gave up waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Wait until job `id` is past its start (copying or later) but has not ended.
#[track_caller]
fn wait_running(mnt: &Path, id: u64) -> Value {
    let start = Instant::now();
    loop {
        let j = job(mnt, id);
        let p = j["phase"].as_str().unwrap_or("").to_string();
        if is_final(&p) {
            panic!(
                "test setup: job {id} ended before the test could act during it (a larger file or a lower \
                 rate= would keep it running): {j:#}\nevents:\n{}",
                events(mnt)
            );
        }
        if !matches!(p.as_str(), "" | "queued" | "assessing" | "allocating") {
            return j;
        }
        assert!(start.elapsed() < JOB_LIMIT, "job {id} never started copying: {j:#}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The writers of `lf` acknowledge more writes while job `id` runs: they overlap the job.
#[track_caller]
fn assert_writes_during(mnt: &Path, id: u64, lf: &LoggedFile) {
    let c0 = max_acked(lf);
    wait_for("more acknowledged writes", || max_acked(lf) >= c0 + 20);
    let j = job(mnt, id);
    assert!(
        !is_final(j["phase"].as_str().unwrap_or("")),
        "test setup: job {id} ended before the writers overlapped it: {j:#}"
    );
}

/// The one job id of an "ok jobs N" reply.
#[track_caller]
fn one_job(reply: &str) -> u64 {
    let ids = reply_jobs(reply);
    assert_eq!(ids.len(), 1, "expected one job in the reply {reply:?}");
    ids[0]
}

/// The timestamp of the first events line containing `needle` (`date` parses it).
#[track_caller]
fn event_time(ev: &str, needle: &str) -> SystemTime {
    let line = ev.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no event {needle:?}:\n{ev}"));
    let stamp = line.split_whitespace().next().unwrap();
    let out = Command::new("date").args(["-u", "-d", stamp, "+%s%N"]).output().expect("date");
    let ns: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("date -d {stamp}"));
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
}

/// The index of the first events line containing `needle`.
#[track_caller]
fn event_at(ev: &str, needle: &str) -> usize {
    ev.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("no event {needle:?} in:\n{ev}"))
}

/// (tracks_used, data_sets) of a volume, from `ferryfs volume list --json`.
fn usage(target: &Path, vol: &str) -> (u64, u64) {
    let v = volume_json(target, vol);
    (u(&v["tracks_used"]), u(&v["data_sets"]))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// Wait (bounded) for a child process; kills it and fails the test if it hangs.
fn wait_child(child: &mut Child, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait for a child") {
            return st;
        }
        if start.elapsed() > JOB_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A thread that sends every line of `r` to the returned channel.
fn lines_of(r: impl Read + Send + 'static) -> (mpsc::Receiver<String>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, h)
}

/// Whether a program is on PATH.
fn have(tool: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false)
}

/// Everything of `.ferry/status` that a refused command must leave as it was.
fn state_of(mnt: &Path) -> Value {
    let st = status(mnt);
    serde_json::json!({
        "volumes": st["volumes"],
        "closed_volumes": st["closed_volumes"],
        "jobs": st["jobs"],
        "plans": st["plans"],
        "max_jobs": st["max_jobs"],
        "copy_rate_limit_bytes_per_s": st["copy_rate_limit_bytes_per_s"],
        "ls": ls_json(mnt),
    })
}

// ---------------------------------------------------------------------------------------
// 1. Live cutover

#[test]
fn live_migration_under_concurrent_random_writes() {
    let tp = TestPool::new("64K", &[("V1", "24M"), ("V2", "16M")]);
    let m = tp.mount();
    // 6 MiB in 16 KiB blocks, three writer threads
    let lf = LoggedFile::create(&m.p("f"), 1, 16 << 10, 384);
    assert_eq!(placement(&m.mnt, "/f").0, vec!["V1"], "test setup: the data set starts on V1");
    let w = Writers::start(&lf, 3, 11);

    let id = one_job(&control(&m.mnt, "migrate /f to V2 rate=3M").unwrap());
    wait_running(&m.mnt, id);
    assert_writes_during(&m.mnt, id, &lf);
    let j = wait_switched(&m.mnt, &[id]).remove(0);
    assert_eq!(j["cutover"], "live", "{j:#}");
    assert_eq!(strs(&j["targets"]), ["V2"], "{j:#}");
    assert!(j["stall_us"].is_u64(), "a live switch reports how long writes were held: {j:#}");
    assert!(j["window_us"].is_null(), "a live switch has no downtime window: {j:#}");
    assert!(u(&j["bytes_copied"]) >= 6 << 20, "the whole data set was copied: {j:#}");
    assert!(u(&j["bytes_resynced"]) > 0, "writes during the copy must have been re-synced: {j:#}");
    let ev = events(&m.mnt);
    assert!(event_at(&ev, &format!("job {id} job-start")) < event_at(&ev, &format!("job {id} switched")), "{ev}");

    // Writes go on after the switch, to the target.
    let c = max_acked(&lf);
    wait_for("writes after the switch", || max_acked(&lf) >= c + 20);
    let writes = w.stop();
    assert!(writes > 0);
    assert_all_acked(&lf);

    assert_eq!(placement(&m.mnt, "/f"), (vec!["V2".to_string()], 1), "the data set is one extent on V2");
    assert_eq!(usage(&m.mnt, "V1"), (0, 0), "the source tracks were freed");
    verify_log(&lf, &m.p("f"), "after the switch");

    m.unmount();
    let m = tp.mount();
    verify_log(&lf, &m.p("f"), "after a remount");
    assert_eq!(placement(&m.mnt, "/f"), (vec!["V2".to_string()], 1), "after a remount");
    // And back, under writers again: job ids are never reused across mounts.
    let w = Writers::start(&lf, 2, 12);
    let back = one_job(&control(&m.mnt, "migrate /f to V1").unwrap());
    assert!(back > id, "job {back} after a remount reuses an id (the first job was {id})");
    wait_switched(&m.mnt, &[back]);
    let c = max_acked(&lf);
    wait_for("writes after the second switch", || max_acked(&lf) >= c + 20);
    assert!(w.stop() > 0);
    assert_all_acked(&lf);
    assert_eq!(placement(&m.mnt, "/f"), (vec!["V1".to_string()], 1), "moved back to V1");
    assert_eq!(usage(&m.mnt, "V2"), (0, 0));
    verify_log(&lf, &m.p("f"), "after moving back");
    m.unmount();
}

/// Threads writing random blocks of a logged file through write-only handles, which ferryfs
/// serves with direct I/O and lets run in parallel (unlike read-write handles, whose writes
/// the kernel serializes). Thread k owns the blocks b with b % threads == k.
struct WriteOnlyWriters {
    stop: Arc<AtomicBool>,
    handles: Vec<thread::JoinHandle<Result<u64, String>>>,
}

impl WriteOnlyWriters {
    fn start(lf: &Arc<LoggedFile>, threads: usize, seed: u64) -> WriteOnlyWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|k| {
                let (lf, stop) = (lf.clone(), stop.clone());
                thread::spawn(move || {
                    let f = OpenOptions::new().write(true).open(&lf.path).map_err(|e| format!("open: {e}"))?;
                    let mine: Vec<u64> = (0..lf.len_blocks()).filter(|b| b % threads as u64 == k as u64).collect();
                    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64 + 1);
                    let mut writes = 0;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let b = mine[(x % mine.len() as u64) as usize];
                        lf.write_block(&f, b).map_err(|e| format!("write of block {b}: {e}"))?;
                        writes += 1;
                    }
                    Ok(writes)
                })
            })
            .collect();
        WriteOnlyWriters { stop, handles }
    }

    /// Stop the threads; the writes they acknowledged. Fails the test if one failed.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handles.into_iter().map(|h| h.join().expect("writer thread").unwrap_or_else(|e| panic!("{e}"))).sum()
    }
}

#[test]
fn live_migration_under_parallel_write_only_writers() {
    let tp = TestPool::new("64K", &[("V1", "24M"), ("V2", "16M")]);
    let m = tp.mount();
    // 4 MiB in 4 KiB blocks: several writes land in each track at once
    let lf = LoggedFile::create(&m.p("p"), 12, 4 << 10, 1024);
    assert_eq!(placement(&m.mnt, "/p").0, vec!["V1"], "test setup");
    let w = WriteOnlyWriters::start(&lf, 4, 13);
    let id = one_job(&control(&m.mnt, "migrate /p to V2 rate=2M").unwrap());
    wait_running(&m.mnt, id);
    assert_writes_during(&m.mnt, id, &lf);
    let j = wait_switched(&m.mnt, &[id]).remove(0);
    assert!(j["stall_us"].is_u64(), "{j:#}");
    assert!(u(&j["bytes_resynced"]) > 0 || u(&j["mirrored_writes"]) > 0, "{j:#}");
    let c = max_acked(&lf);
    wait_for("writes after the switch", || max_acked(&lf) >= c + 20);
    assert!(w.stop() > 0);
    assert_all_acked(&lf);
    assert_eq!(placement(&m.mnt, "/p"), (vec!["V2".to_string()], 1));
    verify_log(&lf, &m.p("p"), "after the switch");
    m.unmount();
    let m = tp.mount();
    verify_log(&lf, &m.p("p"), "after a remount");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 2, 3. Close cutover

#[test]
fn close_cutover_waits_for_the_writers_to_close() {
    let tp = TestPool::new("64K", &[("V1", "24M"), ("V2", "16M")]);
    let m = tp.mount();
    let lf = LoggedFile::create(&m.p("f"), 2, 16 << 10, 256); // 4 MiB
    let w = Writers::start(&lf, 2, 22);

    let id = one_job(&control(&m.mnt, "migrate /f to V2 cutover=close rate=4M").unwrap());
    wait_running(&m.mnt, id);
    assert_writes_during(&m.mnt, id, &lf);
    wait_phase(&m.mnt, id, "awaiting-close");
    // The writers keep the data set open and keep writing: the job waits for them.
    assert_writes_during(&m.mnt, id, &lf);
    let j = job(&m.mnt, id);
    assert_eq!(j["phase"], "awaiting-close", "the writers still hold the file open: {j:#}");
    assert!(!events(&m.mnt).contains(&format!("job {id} downtime-start")), "no downtime while the file is open");

    let writes = w.stop(); // each thread's handle closes as it ends
    assert!(writes > 0);
    assert_all_acked(&lf);
    let j = wait_switched(&m.mnt, &[id]).remove(0);
    assert_eq!(j["cutover"], "close", "{j:#}");
    assert!(j["window_us"].is_u64(), "a close switch reports its downtime window: {j:#}");

    let ev = events(&m.mnt);
    let requested = event_at(&ev, &format!("job {id} close-requested"));
    let start = event_at(&ev, &format!("job {id} downtime-start"));
    let end = event_at(&ev, &format!("job {id} downtime-end"));
    let switched = event_at(&ev, &format!("job {id} switched"));
    assert!(requested < start && start < end && end <= switched, "events out of order:\n{ev}");

    assert_eq!(placement(&m.mnt, "/f"), (vec!["V2".to_string()], 1));
    verify_log(&lf, &m.p("f"), "after the switch");
    m.unmount();
    let m = tp.mount();
    verify_log(&lf, &m.p("f"), "after a remount");
    m.unmount();
}

#[test]
fn close_cutover_holds_new_opens_until_the_switch() {
    let tp = TestPool::new("64K", &[("V1", "24M"), ("V2", "16M")]);
    // The window lasts a tenth of a millisecond; a pause in it (src/failpoint.rs) gives an
    // open the time to be seen waiting.
    const PAUSE_MS: u64 = 300;
    let m = tp.mount_env(&[(ferryfs::failpoint::ENV, &format!("close-window={PAUSE_MS}ms"))]);
    let path = m.p("h");
    let mut model = pattern(3 << 20, 31);
    write_whole(&path, &model);
    let held = OpenOptions::new().read(true).write(true).open(&path).unwrap();

    let id = one_job(&control(&m.mnt, "migrate /h to V2 cutover=close").unwrap());
    wait_phase(&m.mnt, id, "awaiting-close");
    // A write through the held handle while the job waits.
    let patch = pattern(100_000, 32);
    held.write_all_at(&patch, 1_000_000).unwrap();
    model[1_000_000..1_100_000].copy_from_slice(&patch);
    for i in 0..10 {
        let j = job(&m.mnt, id);
        assert_eq!(j["phase"], "awaiting-close", "status read {i}: one handle is still open: {j:#}");
        thread::sleep(Duration::from_millis(30));
    }

    // Readers that open, read and close the file over and over, through the cutover.
    let model = Arc::new(model);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let readers: Vec<_> = (0..2u64)
        .map(|k| {
            let (model, stop, reads, errors, path) =
                (model.clone(), stop.clone(), reads.clone(), errors.clone(), path.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = File::open(&path).and_then(|mut f| {
                        // from the volumes, not from cached pages
                        // SAFETY: fadvise on a file descriptor this test owns.
                        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                        let mut buf = Vec::new();
                        f.read_to_end(&mut buf).map(|_| buf)
                    });
                    let n = reads.load(Ordering::Relaxed);
                    match r {
                        Ok(buf) if buf == *model => {}
                        Ok(buf) => {
                            let at = buf.iter().zip(model.iter()).position(|(a, b)| a != b);
                            errors.lock().unwrap().push(format!(
                                "read {n}: {} bytes (expected {}), first difference at {at:?}",
                                buf.len(),
                                model.len()
                            ));
                        }
                        Err(e) => errors.lock().unwrap().push(format!("read {n}: {e}")),
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    // an application that opens the file now and then
                    thread::sleep(Duration::from_millis(3 + 4 * k));
                }
            })
        })
        .collect();
    wait_for("the readers' first reads", || reads.load(Ordering::Relaxed) >= 6);
    let j = job(&m.mnt, id);
    assert_eq!(j["phase"], "awaiting-close", "the held handle still keeps the job waiting: {j:#}");
    assert!(!events(&m.mnt).contains(&format!("job {id} downtime-start")), "no downtime while the file is held");

    drop(held);
    // The window opens, and the job pauses in it: an open now waits until it ends.
    let paused = format!("job {id} pause point=close-window");
    wait_for("the downtime window", || events(&m.mnt).contains(&paused));
    let pause_began = event_time(&events(&m.mnt), &paused);
    let mut f = File::open(&path).expect("an open during the window waits, then succeeds");
    let returned = SystemTime::now();
    assert!(
        returned >= pause_began + Duration::from_millis(PAUSE_MS),
        "an open during the downtime window returned {:?} into a {PAUSE_MS} ms window: it did not wait",
        returned.duration_since(pause_began).unwrap_or_default()
    );
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_bytes_eq(&got, &model, "read through the open the window held");
    drop(f);
    let j = wait_switched(&m.mnt, &[id]).remove(0);
    let r0 = reads.load(Ordering::Relaxed);
    wait_for("reads after the switch", || reads.load(Ordering::Relaxed) >= r0 + 5);
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader thread");
    }
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "a reader failed during the cutover:\n{}", errors.join("\n"));

    assert!(j["window_us"].is_u64(), "{j:#}");
    let ev = events(&m.mnt);
    let requested = event_at(&ev, &format!("job {id} close-requested"));
    let start = event_at(&ev, &format!("job {id} downtime-start"));
    let end = event_at(&ev, &format!("job {id} downtime-end"));
    assert!(requested < start && start < end, "events out of order:\n{ev}");
    assert_eq!(placement(&m.mnt, "/h"), (vec!["V2".to_string()], 1));
    assert_bytes_eq(&read_fresh(&path), &model, "after the switch");
    m.unmount();
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("h")).unwrap(), &model, "after a remount");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 4. Growth and truncation during a job

#[test]
fn growth_and_truncation_during_a_job() {
    let tp = TestPool::new("64K", &[("V1", "24M"), ("V2", "16M")]);
    let m = tp.mount();
    let path = m.p("g");
    let mut model = pattern(2 << 20, 41);
    write_whole(&path, &model);
    assert_eq!(placement(&m.mnt, "/g").0, vec!["V1"], "test setup");

    let id = one_job(&control(&m.mnt, "migrate /g to V2 rate=1M").unwrap());
    wait_running(&m.mnt, id);
    let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let write_at = |model: &mut Vec<u8>, at: usize, data: &[u8]| {
        f.write_all_at(data, at as u64).unwrap();
        if model.len() < at + data.len() {
            model.resize(at + data.len(), 0);
        }
        model[at..at + data.len()].copy_from_slice(data);
    };
    // grow: an append of 768 KiB
    let at = model.len();
    write_at(&mut model, at, &pattern(768 << 10, 42));
    // cut in the middle, inside what the copier has copied already
    wait_for("the copy to pass 1.6 MB", || {
        let j = job(&m.mnt, id);
        assert!(!is_final(j["phase"].as_str().unwrap_or("")), "test setup: the job ended too soon: {j:#}");
        u(&j["bytes_copied"]) >= 1_600_000
    });
    f.set_len(1_200_000).unwrap();
    model.truncate(1_200_000);
    // write past the cut, leaving a hole that must read as zeros
    write_at(&mut model, 1_500_000, &pattern(300_000, 43));
    // grow again
    let at = model.len();
    write_at(&mut model, at, &pattern(1 << 20, 44));
    // cut again inside a track, then write a little at the new end
    let cut = model.len() - 100_003;
    f.set_len(cut as u64).unwrap();
    model.truncate(cut);
    write_at(&mut model, cut, &pattern(4096, 45));
    // and overwrite something the copier may have copied already
    write_at(&mut model, 4096, &pattern(70_000, 46));
    drop(f);
    let j = job(&m.mnt, id);
    assert!(
        !is_final(j["phase"].as_str().unwrap_or("")),
        "test setup: the job ended before the growth and truncation: {j:#}"
    );

    wait_switched(&m.mnt, &[id]);
    assert_bytes_eq(&read_fresh(&path), &model, "after the switch");
    let d = data_set(&m.mnt, "/g");
    assert_eq!(u(&d["size_bytes"]), model.len() as u64, "{d:#}");
    assert_eq!(strs(&d["volumes"]), ["V2"], "every extent is on the target: {d:#}");
    let ts = 64 << 10;
    let nonzero_tracks = model.chunks(ts).filter(|t| t.iter().any(|&b| b != 0)).count() as u64;
    assert!(u(&d["allocated_tracks"]) >= nonzero_tracks, "every track with data is mapped: {d:#}");
    assert_eq!(usage(&m.mnt, "V1"), (0, 0), "the source tracks were freed");

    m.unmount();
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("g")).unwrap(), &model, "after a remount");
    m.unmount();
}

/// The story: punch-hole and zero-range always marked their tracks dirty, and a truncate
/// marked every track past the cut, even with mirrored writes on; an application that mixed
/// them with its writes kept the dirty set from shrinking, and the job spun through its
/// re-sync passes. Now every call that changes bytes or the size keeps the source and the
/// target equal once mirrored writes are on, so the job converges in a few passes while the
/// application goes on: no stop is needed for the switch.
#[test]
fn punch_zero_range_and_truncate_mirror_and_converge() {
    const SIZE: u64 = 4 << 20;
    let seed = seed_from_env("punch_zero_range_and_truncate_mirror_and_converge");
    let tp = TestPool::new("64K", &[("V1", "16M"), ("V2", "16M")]);
    let m = tp.mount();
    let path = m.p("mixed");
    write_whole(&path, &pattern(SIZE as usize, 51));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let app = {
        let (path, stop, ops) = (path.clone(), stop.clone(), ops.clone());
        thread::spawn(move || {
            let mut model = pattern(SIZE as usize, 51);
            let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut rng = Rng::new(seed);
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let at = rng.below(SIZE);
                let len = 1 + rng.below((SIZE - at).min(300_000));
                match rng.below(5) {
                    0 | 1 => {
                        let data = pattern(len as usize, seed ^ n);
                        f.write_all_at(&data, at).unwrap();
                        if model.len() < (at + len) as usize {
                            model.resize((at + len) as usize, 0);
                        }
                        model[at as usize..(at + len) as usize].copy_from_slice(&data);
                    }
                    2 => {
                        // Down or up, never past the data set's first size.
                        f.set_len(at).unwrap();
                        model.resize(at as usize, 0);
                    }
                    3 => {
                        let r = unsafe_fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, at, len);
                        r.unwrap_or_else(|e| panic!("zero range {at}+{len}: {e}"));
                        if model.len() < (at + len) as usize {
                            model.resize((at + len) as usize, 0);
                        }
                        model[at as usize..(at + len) as usize].fill(0);
                    }
                    _ => {
                        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                        let r = unsafe_fallocate(&f, mode, at, len);
                        r.unwrap_or_else(|e| panic!("punch {at}+{len}: {e}"));
                        let end = ((at + len) as usize).min(model.len());
                        if end > at as usize {
                            model[at as usize..end].fill(0);
                        }
                    }
                }
                ops.fetch_add(1, Ordering::Release);
            }
            model
        })
    };
    wait_for("the application to start", || ops.load(Ordering::Acquire) >= 50);
    // Capped: the data set's holes (punched, truncated) cost the copier nothing, and the job
    // must last while the application works.
    let id = one_job(&control(&m.mnt, "migrate /mixed to V2 rate=2M").unwrap());
    let at_start = ops.load(Ordering::Acquire);
    let j = wait_jobs(&m.mnt, &[id]).remove(0);
    let at_switch = ops.load(Ordering::Acquire);
    stop.store(true, Ordering::Release);
    let model = app.join().expect("the application thread");
    assert_eq!(j["phase"], "switched", "the job switched while the application ran: {j:#}\n{}", events(&m.mnt));
    assert!(at_switch > at_start + 20, "test setup: the application ran {} calls during the job", at_switch - at_start);
    assert!(u(&j["passes"]) <= 8, "the job converged in a few re-sync passes: {j:#}\n{}", events(&m.mnt));
    // (No placement check: after the switch the application's growth may land anywhere.)
    assert_bytes_eq(&read_fresh(&path), &model, "after the switch");
    m.unmount();
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("mixed")).unwrap(), &model, "after a remount");
    m.unmount();
}

/// fallocate(2) on an open file.
fn unsafe_fallocate(f: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a file descriptor this test owns.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The daemon's peak resident memory (VmHWM), bytes.
fn peak_rss_bytes(pid: i32) -> u64 {
    let st = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = st.lines().find_map(|l| l.strip_prefix("VmHWM:")).expect("VmHWM in /proc/PID/status");
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

/// The story: the copier's buffer grew to the whole run it copied: a chunk (at least one
/// track) or a dirty run (up to 64 tracks, with writes held); with 8 MiB tracks the daemon
/// went from 5 MB to 275 MB. The copier now reads and writes in pieces of at most 1 MiB
/// whatever the track size. A data set is migrated while a writer dirties every track over
/// and over, so that runs of dirty tracks are re-synced: with 8 MiB tracks (16 of them),
/// and with 64 MiB tracks (2 of them: the old buffer held a whole track even for the bulk
/// copy). The daemon's peak memory must grow by less than 32 MiB: half a 64 MiB track, and
/// 32 pieces, room for the allocator and the kernel's requests in flight.
#[test]
fn copy_memory_is_bounded_whatever_the_track_size() {
    for (track_size, track_bytes, tracks) in [("8M", 8usize << 20, 16u64), ("64M", 64 << 20, 2)] {
        let tp = TestPool::new(track_size, &[("V1", "256M"), ("V2", "256M")]);
        let m = tp.mount();
        let path = m.p("big");
        write_whole(&path, &pattern(track_bytes * tracks as usize, 91));
        let from = placement(&m.mnt, "/big").0[0].clone();
        let to = if from == "V1" { "V2" } else { "V1" };
        let pid = m.daemon_pid();
        let before = peak_rss_bytes(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let writer = {
            let (path, stop, rounds) = (path.clone(), stop.clone(), rounds.clone());
            thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(&path).unwrap();
                let chunk = pattern(1 << 20, 92);
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    // One write in every track, so that every track is dirty again.
                    for t in 0..tracks {
                        f.write_all_at(&chunk, t * track_bytes as u64 + (n % 8) * (1 << 20)).unwrap();
                    }
                    n += 1;
                    rounds.store(n, Ordering::Release);
                }
            })
        };
        wait_for("the writer to start", || rounds.load(Ordering::Acquire) >= 1);
        let id = one_job(&control(&m.mnt, &format!("migrate /big to {to}")).unwrap());
        let j = wait_jobs(&m.mnt, &[id]).remove(0);
        stop.store(true, Ordering::Release);
        writer.join().unwrap();
        let after = peak_rss_bytes(pid);
        assert_eq!(j["phase"], "switched", "{j:#}");
        assert!(u(&j["bytes_resynced"]) > 0, "test setup: the job re-synced nothing: {j:#}");
        let grew = after.saturating_sub(before);
        eprintln!("{track_size} tracks: peak memory {} MiB before the job, +{} KiB", before >> 20, grew >> 10);
        assert!(
            grew < 32 << 20,
            "{track_size} tracks: the daemon's peak memory grew by {} MiB during the job ({} MiB before): {j:#}",
            grew >> 20,
            before >> 20
        );
        m.unmount();
    }
}

/// A data set removed while its job runs, and one removed while its job is queued: at the
/// unmount neither record outlives its data set (fsck is clean, nothing is left to start
/// again, no reservation leaks), and the other data sets are intact.
#[test]
fn data_sets_removed_during_their_jobs_leave_no_record() {
    let tp = TestPool::new("16K", &[("V1", "8M"), ("V2", "8M")]);
    let m = tp.mount();
    let keep = pattern(300_000, 5);
    write_whole(&m.p("keep"), &keep);
    write_whole(&m.p("running"), &pattern(2 << 20, 6));
    write_whole(&m.p("queued"), &pattern(500_000, 7));
    control(&m.mnt, "set max-jobs=1").unwrap();
    let other = |path: &str| if placement(&m.mnt, path).0.contains(&"V1".to_string()) { "V2" } else { "V1" };
    let line = format!("migrate /running to {} rate=64K", other("/running"));
    let running = one_job(&control(&m.mnt, &line).unwrap());
    let queued = one_job(&control(&m.mnt, &format!("migrate /queued to {}", other("/queued"))).unwrap());
    wait_running(&m.mnt, running);
    assert_eq!(job(&m.mnt, queued)["phase"], "queued", "test setup: max-jobs=1 keeps the second job queued");
    fs::remove_file(m.p("running")).unwrap();
    fs::remove_file(m.p("queued")).unwrap();
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    let st = status(&m.mnt);
    assert!(st["jobs"].as_array().unwrap().is_empty(), "no job is left to start again: {st:#}");
    let (held, ls) = held_tracks(&m.mnt);
    for v in ["V1", "V2"] {
        let used = usage(&m.mnt, v).0;
        assert_eq!(used, held.get(v).copied().unwrap_or(0), "{v}: a reservation leaked\n{ls:#}");
    }
    assert_bytes_eq(&fs::read(m.p("keep")).unwrap(), &keep, "keep");
    m.unmount();
}

/// The story: a merge failed with "job 805 failed: the data set no longer exists" though its
/// volumes ended empty: a data set deleted while its job was queued (or copying) failed the
/// job, and the plan with it. A deleted data set needs no move: its job ends `gone`, the
/// plan goes on, ends done and says so, and `--wait` exits 0.
#[test]
fn data_sets_deleted_during_a_merge_end_gone_and_the_plan_succeeds() {
    let tp = TestPool::new("16K", &[("V1", "8M"), ("V2", "8M")]);
    let m = tp.mount();
    let names = ["a", "b", "c", "d"];
    for (i, n) in names.iter().enumerate() {
        write_whole(&m.p(n), &pattern(1 << 20, 60 + i as u64));
    }
    // Added after the writes, so that every data set is on a source.
    control(&m.mnt, "add V3 size=16M").unwrap();
    control(&m.mnt, "set max-jobs=1").unwrap();
    let mnt = s(&m.mnt).to_string();
    let mut child = Command::new(bin())
        .args(["merge", &mnt, "V1", "V2", "--into", "V3", "--rate", "1M", "--wait", "--interval", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut plan_jobs = Vec::new();
    wait_for("the plan's jobs", || {
        plan_jobs = status(&m.mnt)["plans"]
            .as_array()
            .unwrap()
            .first()
            .map(|p| p["jobs"].as_array().unwrap().iter().map(u).collect())
            .unwrap_or_default();
        plan_jobs.len() == names.len()
    });
    let copying = plan_jobs[0];
    let queued = plan_jobs[names.len() - 1];
    wait_running(&m.mnt, copying);
    assert_eq!(job(&m.mnt, queued)["phase"], "queued", "test setup: max-jobs=1 keeps the last job queued");
    let path_of = |id: u64| job(&m.mnt, id)["path"].as_str().unwrap().to_string();
    let (copying_path, queued_path) = (path_of(copying), path_of(queued));
    fs::remove_file(m.p(copying_path.trim_start_matches('/'))).unwrap();
    fs::remove_file(m.p(queued_path.trim_start_matches('/'))).unwrap();
    let status_code = wait_child(&mut child, "merge --wait");
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let ev = events(&m.mnt);
    assert!(status_code.success(), "merge --wait exits 0 ({status_code}):\n{out}\nevents:\n{ev}");
    let st = status(&m.mnt);
    let plan = &st["plans"][0];
    assert_eq!(plan["phase"], "done", "{plan:#}\n{ev}");
    for (id, path) in [(copying, &copying_path), (queued, &queued_path)] {
        assert_eq!(job(&m.mnt, id)["phase"], "gone", "job {id} of the deleted {path}");
        assert!(
            ev.contains(&format!("job {id} gone path={path} (the data set was deleted; nothing to move)")),
            "the events say job {id} had nothing to move:\n{ev}"
        );
        assert!(out.contains(&format!("job {id} {path}: the data set was deleted; nothing to move")), "{out}");
    }
    assert!(ev.contains("2 data sets were deleted before they were moved; nothing to move"), "{ev}");
    assert!(ev.contains("merge-done"), "{ev}");
    for id in plan_jobs.iter().filter(|id| ![copying, queued].contains(id)) {
        assert_eq!(job(&m.mnt, *id)["phase"], "switched");
    }
    assert_eq!(usage(&m.mnt, "V1"), (0, 0), "V1 is empty");
    assert_eq!(usage(&m.mnt, "V2"), (0, 0), "V2 is empty");
    let (held, ls) = held_tracks(&m.mnt);
    assert_eq!(usage(&m.mnt, "V3").0, held.get("V3").copied().unwrap_or(0), "no reservation leaked\n{ls:#}");
    m.unmount();
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------------------------------
// 5. Cancel

#[test]
fn cancel_rolls_back_and_keeps_every_write() {
    let tp = TestPool::new("64K", &[("V1", "32M"), ("V2", "16M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    let a = LoggedFile::create(&m.p("a"), 5, 16 << 10, 256); // 4 MiB
    let b = LoggedFile::create(&m.p("b"), 6, 16 << 10, 256);
    let c_bytes = pattern(300_000, 51);
    write_whole(&m.p("c"), &c_bytes);
    for p in ["/a", "/b", "/c"] {
        assert_eq!(placement(&m.mnt, p).0, vec!["V1"], "test setup: {p} starts on V1");
    }
    let v1_before = usage(&m.mnt, "V1");
    let v2_before = usage(&m.mnt, "V2");
    let wa = Writers::start(&a, 2, 51);
    let wb = Writers::start(&b, 1, 52);

    let ida = one_job(ferry_ok(&["migrate", &mnt, s(&m.p("a")), "--to", "V2", "--rate", "512K"]).trim());
    let idb = one_job(&control(&m.mnt, "migrate /b to V2 rate=512K").unwrap());
    wait_running(&m.mnt, ida);
    wait_running(&m.mnt, idb);
    assert_writes_during(&m.mnt, ida, &a);
    assert_writes_during(&m.mnt, idb, &b);
    assert!(usage(&m.mnt, "V2").0 > v2_before.0, "the running jobs hold target tracks");
    // The CLI's views of the running jobs.
    let text = ferry_ok(&["status", &mnt]);
    for (id, p) in [(ida, "/a"), (idb, "/b")] {
        assert!(
            text.lines().any(|l| l.split_whitespace().take(2).eq([id.to_string().as_str(), p])),
            "`ferryfs status` lists job {id} {p}:\n{text}"
        );
    }
    let json = parse_json(&ferry_ok(&["status", &mnt, "--json"]));
    let listed: Vec<u64> = json["jobs"].as_array().unwrap().iter().map(|j| u(&j["id"])).collect();
    assert_eq!(listed, [ida, idb], "{json:#}");

    let out = ferry_ok(&["cancel", &mnt, &ida.to_string()]);
    assert_eq!(out.trim(), format!("ok cancelling job {ida}"));
    assert_eq!(control(&m.mnt, &format!("cancel {idb}")).unwrap(), format!("ok cancelling job {idb}"));
    let jobs = wait_jobs(&m.mnt, &[ida, idb]);
    for j in &jobs {
        assert_eq!(j["phase"], "cancelled", "{j:#}\nevents:\n{}", events(&m.mnt));
        assert!(j["stall_us"].is_null() && j["window_us"].is_null(), "a cancelled job never switched: {j:#}");
    }
    let ev = events(&m.mnt);
    event_at(&ev, &format!("job {ida} cancelled"));
    event_at(&ev, &format!("job {idb} cancelled"));

    // Writes go on after the cancel, on the source.
    let (ca, cb) = (max_acked(&a), max_acked(&b));
    wait_for("writes after the cancel", || max_acked(&a) >= ca + 20 && max_acked(&b) >= cb + 20);
    assert!(wa.stop() > 0 && wb.stop() > 0);
    assert_all_acked(&a);
    assert_all_acked(&b);

    assert_eq!(placement(&m.mnt, "/a").0, vec!["V1"], "a cancelled job leaves the data set on its source");
    assert_eq!(placement(&m.mnt, "/b").0, vec!["V1"], "a cancelled job leaves the data set on its source");
    assert_eq!(usage(&m.mnt, "V2"), v2_before, "the target's tracks were given back");
    assert_eq!(usage(&m.mnt, "V1"), v1_before, "the source is untouched");
    verify_log(&a, &m.p("a"), "a after the cancel");
    verify_log(&b, &m.p("b"), "b after the cancel");

    // Cancelling an ended job is refused.
    let (code, err) = ferry_err(&["cancel", &mnt, &ida.to_string()]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, &format!("job {ida} has already ended"));
    assert!(err.contains("cancelled"), "{err}");
    let e = control(&m.mnt, &format!("cancel {idb}")).unwrap_err();
    assert!(e.contains(&format!("job {idb} has already ended")), "{e}");
    let idc = one_job(&control(&m.mnt, "migrate /c to V2").unwrap());
    wait_switched(&m.mnt, &[idc]);
    let (code, err) = ferry_err(&["cancel", &mnt, &idc.to_string()]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, &format!("job {idc} already switched"));
    let (code, err) = ferry_err(&["cancel", &mnt, "9999"]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, "no job or plan 9999");
    assert_eq!(placement(&m.mnt, "/c"), (vec!["V2".to_string()], 1));
    assert_bytes_eq(&read_fresh(&m.p("c")), &c_bytes, "c");

    m.unmount();
    let m = tp.mount();
    verify_log(&a, &m.p("a"), "a after a remount");
    verify_log(&b, &m.p("b"), "b after a remount");
    m.unmount();
}

/// The story: `ok cancelling` was sent and the job switched anyway. The cancel flag was read
/// before the cutover and not after the writes were held, so a cancel that came in between
/// was acknowledged and ignored. The flag is now read at the point of no return, in the
/// hold, under the lock the cancel takes: a cancel acknowledged before it wins (the job ends
/// cancelled, the source untouched, the target freed), and one after it is refused as too
/// late. The pause points put the cancel at each side of that point every time.
#[test]
fn a_cancel_at_the_cutover_wins_or_is_refused_as_too_late() {
    let tp = TestPool::new("64K", &[("V1", "8M"), ("V2", "8M")]);
    let data = pattern(1 << 20, 71);
    {
        let m = tp.mount();
        write_whole(&m.p("f"), &data);
        m.unmount();
    }
    let source = |m: &Mounted| placement(&m.mnt, "/f").0[0].clone();
    let target = |m: &Mounted| if source(m) == "V1" { "V2" } else { "V1" };
    let wait_pause = |m: &Mounted, id: u64, point: &str| {
        let needle = format!("job {id} pause point={point}");
        wait_for(&needle, || events(&m.mnt).contains(&needle));
    };

    // In the hold, before the point of no return: the cancel wins.
    let m = tp.mount_env(&[("FERRYFS_PAUSE", "live-hold=2s")]);
    let (from, to) = (source(&m), target(&m));
    let id = one_job(&control(&m.mnt, &format!("migrate /f to {to}")).unwrap());
    wait_pause(&m, id, "live-hold");
    assert_eq!(control(&m.mnt, &format!("cancel {id}")).unwrap(), format!("ok cancelling job {id}"));
    let j = wait_jobs(&m.mnt, &[id]).remove(0);
    assert_eq!(j["phase"], "cancelled", "an acknowledged cancel wins: {j:#}\n{}", events(&m.mnt));
    assert_eq!(placement(&m.mnt, "/f").0, vec![from.clone()], "the source is untouched");
    assert_eq!(usage(&m.mnt, to).0, 0, "the target is freed");
    assert_bytes_eq(&read_fresh(&m.p("f")), &data, "after the cancel");
    m.unmount();
    fsck_clean(&tp.pool);

    // Past it: the cancel is refused, and the job switches.
    let m = tp.mount_env(&[("FERRYFS_PAUSE", "live-switch=2s")]);
    let id = one_job(&control(&m.mnt, &format!("migrate /f to {to}")).unwrap());
    wait_pause(&m, id, "live-switch");
    let why = control(&m.mnt, &format!("cancel {id}")).unwrap_err();
    assert_eq!(why, format!("job {id}: too late: the switch is under way"));
    let j = wait_jobs(&m.mnt, &[id]).remove(0);
    assert_eq!(j["phase"], "switched", "{j:#}");
    assert_eq!(placement(&m.mnt, "/f").0, vec![to.to_string()]);
    assert_eq!(usage(&m.mnt, &from).0, 0, "the source is freed");
    assert_bytes_eq(&read_fresh(&m.p("f")), &data, "after the switch");
    let why = control(&m.mnt, &format!("cancel {id}")).unwrap_err();
    assert_eq!(why, format!("job {id} already switched"));
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn cancelling_a_plan_stops_its_jobs_and_reopens_its_sources() {
    let tp = TestPool::new("64K", &[("V1", "16M"), ("V2", "8M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..4u64 {
        let path = format!("/p{i}");
        let data = pattern(1 << 20, 300 + i);
        write_whole(&m.p(&path), &data);
        assert_eq!(placement(&m.mnt, &path).0, vec!["V1"], "test setup");
        files.insert(path, data);
    }
    let v1_before = usage(&m.mnt, "V1");

    let out = ferry_ok(&["drain", &mnt, "V1", "--rate", "256K"]);
    let plan = reply_plan(out.trim()).unwrap_or_else(|| panic!("no plan in the reply {out:?}"));
    let ids = reply_jobs(out.trim());
    assert_eq!(ids.len(), 4, "{out}");
    wait_running(&m.mnt, ids[0]);
    assert_eq!(strs(&status(&m.mnt)["closed_volumes"]), ["V1"], "a drained volume takes no new data");
    // A new data set goes elsewhere while V1 is being drained, though V1 has the most room.
    write_whole(&m.p("during"), &pattern(100_000, 310));
    assert_eq!(placement(&m.mnt, "/during").0, vec!["V2"], "a new data set went to a closed volume");

    let out = ferry_ok(&["cancel", &mnt, &plan.to_string()]);
    assert_eq!(out.trim(), format!("ok cancelling plan {plan}"));
    let p = wait_plan(&m.mnt, plan);
    assert_eq!(p["phase"], "cancelled", "{p:#}");
    for j in wait_jobs(&m.mnt, &ids) {
        assert_eq!(j["phase"], "cancelled", "every job of the plan was cancelled: {j:#}");
    }
    let st = status(&m.mnt);
    assert!(st["closed_volumes"].as_array().unwrap().is_empty(), "the source is open again: {st:#}");
    for (path, data) in &files {
        assert_eq!(placement(&m.mnt, path).0, vec!["V1"], "{path} stays on its source");
        assert_bytes_eq(&read_fresh(&m.p(path)), data, path);
    }
    assert_eq!(usage(&m.mnt, "V1"), v1_before, "the source is untouched");
    assert_eq!(usage(&m.mnt, "V2").1, 1, "only the new data set is on V2");
    // V1 takes new data again.
    write_whole(&m.p("after"), &pattern(100_000, 311));
    assert_eq!(placement(&m.mnt, "/after").0, vec!["V1"], "a new data set goes to the reopened volume");

    let (code, err) = ferry_err(&["cancel", &mnt, &plan.to_string()]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, &format!("plan {plan} has already ended"));
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 6. Merge

#[test]
fn merge_three_volumes_into_one_then_retire() {
    let tp = TestPool::new("16K", &[("V1", "4M"), ("V2", "4M"), ("V3", "4M")]);
    let ts: u64 = 16 << 10;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let m = tp.mount();
    // written during the merge
    let lf = LoggedFile::create(&m.p("w.bin"), 7, 16 << 10, 32);
    for d in 0..4 {
        fs::create_dir(m.p(&format!("d{d}"))).unwrap();
    }
    for i in 0..56usize {
        let len = match i % 4 {
            0 => 1 + (i * 97) % 4000,
            1 => 5_000 + i * 300,
            2 => 40_000 + i * 2_000,
            _ if i < 12 => 1_100_000 + i * 1_000,
            _ => 30_000 + i * 500,
        };
        let path = format!("/d{}/f{i:02}", i % 4);
        let data = pattern(len, 600 + i as u64);
        if i % 2 == 0 {
            write_whole(&m.p(&path), &data);
        } else {
            fs::write(m.p(&path), &data).unwrap();
        }
        files.insert(path, data);
    }
    // Two data sets that no volume holds alone: each spills over two volumes.
    for k in 0..2u64 {
        let vl = volume_list_json(&m.mnt);
        let mut free: Vec<u64> = vl["volumes"].as_array().unwrap().iter().map(|v| u(&v["tracks_free"])).collect();
        free.sort_unstable_by(|a, b| b.cmp(a));
        let tracks = free[0] + free[1] / 2;
        let path = format!("/span{k}");
        let data = pattern((tracks * ts - 1000) as usize, 700 + k);
        write_whole(&m.p(&path), &data);
        files.insert(path, data);
    }
    let ls = ls_json(&m.mnt);
    let spanning = ls["data_sets"].as_array().unwrap().iter().filter(|d| d["volumes"].as_array().unwrap().len() > 1);
    assert!(spanning.count() >= 2, "test setup: two data sets span volumes:\n{ls:#}");
    assert!(ls["data_sets"].as_array().unwrap().len() >= 50, "test setup: at least 50 data sets");
    // The target joins the pool while it is mounted and a writer writes.
    let mnt = s(&m.mnt).to_string();
    let w = Writers::start(&lf, 1, 61);
    let out = ferry_ok(&["volume", "add", &mnt, "V4", "--size", "16M"]);
    assert!(out.starts_with("ok added V4 tracks=1024"), "{out}");
    let c0 = max_acked(&lf);
    // rate= makes the writer's job last long enough to overlap its writes
    let out = ferry_ok(&["merge", &mnt, "V1", "V2", "V3", "--into", "V4", "--rate", "1M"]);
    let plan = reply_plan(out.trim()).unwrap_or_else(|| panic!("no plan in the reply {out:?}"));
    assert!(reply_jobs(out.trim()).len() >= 50, "a job per data set: {out}");
    let w_job = status(&m.mnt)["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["path"] == "/w.bin")
        .map(|j| u(&j["id"]))
        .expect("a job for /w.bin");
    wait_running(&m.mnt, w_job);
    assert_writes_during(&m.mnt, w_job, &lf);
    let p = wait_plan(&m.mnt, plan);
    assert_eq!(p["phase"], "done", "{p:#}\nevents:\n{}", events(&m.mnt));
    assert_eq!(p["kind"], "merge", "{p:#}");
    assert!(max_acked(&lf) > c0, "the writer wrote during the merge");
    let ids: Vec<u64> = p["jobs"].as_array().unwrap().iter().map(u).collect();
    wait_switched(&m.mnt, &ids);
    let wj = job(&m.mnt, w_job);
    assert!(u(&wj["bytes_resynced"]) > 0, "the writes during the copy were re-synced: {wj:#}");
    assert!(w.stop() > 0);
    assert_all_acked(&lf);
    let ev = events(&m.mnt);
    assert!(event_at(&ev, &format!("plan {plan} merge-start")) < event_at(&ev, &format!("plan {plan} merge-done")));

    for v in ["V1", "V2", "V3"] {
        assert_eq!(usage(&m.mnt, v), (0, 0), "{v} is empty after the merge");
    }
    let ls = ls_json(&m.mnt);
    let sets = ls["data_sets"].as_array().unwrap();
    assert_eq!(sets.len(), files.len() + 1, "{ls:#}");
    for d in sets {
        assert_eq!(strs(&d["volumes"]), ["V4"], "every data set is on the target: {d:#}");
        assert_eq!(u(&d["extent_count"]), 1, "every data set is one extent: {d:#}");
    }
    for (path, data) in &files {
        assert_bytes_eq(&read_fresh(&m.p(path)), data, path);
    }
    verify_log(&lf, &m.p("w.bin"), "w.bin after the merge");
    let closed: BTreeSet<String> = strs(&status(&m.mnt)["closed_volumes"]).into_iter().collect();
    assert_eq!(closed, ["V1", "V2", "V3"].iter().map(|s| s.to_string()).collect(), "the sources stay closed");

    // An empty source retires; the target, which holds data, does not.
    let image = PathBuf::from(volume_json(&m.mnt, "V1")["path"].as_str().unwrap());
    ferry_ok(&["volume", "retire", &mnt, "V1"]);
    let names: Vec<String> = volume_list_json(&m.mnt)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().into())
        .collect();
    assert_eq!(names, ["V2", "V3", "V4"], "V1 is gone from the volume list");
    assert!(!image.exists(), "the retired image {} was removed", image.display());
    let (code, err) = ferry_err(&["volume", "retire", &mnt, "V4"]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, "V4");
    assert!(err.contains("not empty"), "{err}");
    assert!(volume_list_json(&m.mnt)["volumes"].as_array().unwrap().iter().any(|v| v["name"] == "V4"));

    m.unmount();
    let m = tp.mount();
    for (path, data) in &files {
        assert_bytes_eq(&fs::read(m.p(path)).unwrap(), data, &format!("{path} after a remount"));
    }
    verify_log(&lf, &m.p("w.bin"), "w.bin after a remount");
    let closed: BTreeSet<String> = strs(&status(&m.mnt)["closed_volumes"]).into_iter().collect();
    assert_eq!(closed, ["V2", "V3"].iter().map(|s| s.to_string()).collect(), "the emptied sources stay closed");
    m.unmount();
}

/// Writes a control line that must be refused with `errno`; returns the reply read back
/// from the same handle.
#[track_caller]
fn refused(mnt: &Path, line: &str, errno: i32) -> String {
    let mut f = OpenOptions::new().read(true).write(true).open(mnt.join(".ferry/control")).unwrap();
    assert_errno(f.write(format!("{line}\n").as_bytes()), errno, line);
    let mut reply = String::new();
    f.read_to_string(&mut reply).unwrap();
    reply
}

fn closed_volumes(mnt: &Path) -> Vec<String> {
    strs(&status(mnt)["closed_volumes"])
}

/// A drained volume stays closed to allocation until `volume reopen` gives it back, on a
/// mount or offline; a volume that is not closed, or that a running plan is emptying, is
/// refused, and a cancelled plan reopens its source by itself.
#[test]
fn a_drained_volume_takes_data_again_once_reopened() {
    let tp = TestPool::new("16K", &[("V1", "4M"), ("V3", "4M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    let a = pattern(1 << 20, 21);
    write_whole(&m.p("a"), &a);
    write_whole(&m.p("b"), &pattern(1 << 20, 22));
    ferry_ok(&["volume", "add", &mnt, "V2", "--size", "8M"]);
    let src = placement(&m.mnt, "/a").0[0].clone();
    let other = if src == "V1" { "V3" } else { "V1" }.to_string();
    ferry_ok(&["drain", &mnt, &src, "--wait"]);
    assert_eq!(closed_volumes(&m.mnt), [src.as_str()]);
    assert_eq!(placement(&m.mnt, "/a").0, ["V2"], "the drain moved /a to the volume with the most room");

    let reply = refused(&m.mnt, "reopen V2", libc::EINVAL);
    assert!(reply.contains("not closed"), "{reply}");
    let reply = refused(&m.mnt, "reopen V9", libc::ENOENT);
    assert!(reply.contains("no volume named"), "{reply}");
    let reply = refused(&m.mnt, &format!("migrate /a to {src}"), libc::EINVAL);
    assert!(reply.contains("being emptied"), "{reply}");
    // A volume a running plan empties can't be reopened; cancelling the plan reopens it.
    let plan = reply_plan(&control(&m.mnt, &format!("drain V2 to {other} rate=16K")).unwrap()).unwrap();
    let reply = refused(&m.mnt, "reopen V2", libc::EBUSY);
    assert!(reply.contains(&format!("plan {plan} is emptying it")), "{reply}");
    control(&m.mnt, &format!("cancel {plan}")).unwrap();
    assert_eq!(wait_plan(&m.mnt, plan)["phase"], "cancelled");
    assert_eq!(closed_volumes(&m.mnt), [src.as_str()], "the cancelled plan reopened V2, not the drained one");

    let out = ferry_ok(&["volume", "reopen", &mnt, &src]);
    assert_eq!(out.trim(), format!("ok reopened {src}"));
    assert!(closed_volumes(&m.mnt).is_empty());
    assert!(events(&m.mnt).contains(&format!("volume {src} reopened")));
    ferry_ok(&["migrate", &mnt, "/a", "--to", &src, "--wait"]);
    assert_eq!(placement(&m.mnt, "/a"), (vec![src.clone()], 1));

    // Offline too, and it lasts.
    ferry_ok(&["drain", &mnt, &src, "--wait"]);
    assert_eq!(closed_volumes(&m.mnt), [src.as_str()]);
    m.unmount();
    let out = ferry_ok(&["volume", "reopen", s(&tp.pool), &src]);
    assert_eq!(out.trim(), format!("reopened volume {src}"));
    let (code, err) = ferry_err(&["volume", "reopen", s(&tp.pool), &src]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, "not closed");
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert!(closed_volumes(&m.mnt).is_empty(), "the reopen lasts across a remount");
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &a, "a");
    m.unmount();
}

/// The size `df` shows for a mount, in bytes (`stat -f`).
fn df_bytes(mnt: &Path) -> u64 {
    let out = Command::new("stat").args(["-f", "-c", "%b %S"]).arg(mnt).output().expect("stat -f");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text.split_whitespace().map(|w| w.parse().expect("a number from stat -f")).collect();
    v[0] * v[1]
}

/// `ferryfs volume add MOUNTPOINT`: a full pool takes the write it refused as soon as a
/// volume joins, `df` and the volume list show the new size at once, a volume whose image
/// lives outside the pool is a migration target at once, and both survive a remount.
#[test]
fn volume_added_to_a_mount_takes_data_at_once() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    let a = pattern(900_000, 11);
    write_whole(&m.p("a"), &a);
    let b = pattern(2 << 20, 12);
    let mut f = File::create(m.p("b")).unwrap();
    let e = f.write_all(&b).and_then(|_| f.sync_all()).expect_err("2 MiB more on a 1 MiB pool");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    drop(f);
    let df0 = df_bytes(&m.mnt);

    let out = ferry_ok(&["volume", "add", &mnt, "V2", "--size", "8M"]);
    assert_eq!(out.trim(), format!("ok added V2 tracks=128 image={}", tp.pool.join("volumes/V2.img").display()));
    assert_eq!(df_bytes(&m.mnt), df0 + (8 << 20), "df shows the new volume");
    assert!(events(&m.mnt).contains("volume V2 added size=8388608 tracks=128"), "{}", events(&m.mnt));
    write_whole(&m.p("b"), &b);
    assert_eq!(placement(&m.mnt, "/b").0, vec!["V2"], "the refused data set now fits on the new volume");

    // An image outside the pool, named relative to the CLI's directory.
    let outside = tp.dir().join("elsewhere");
    fs::create_dir(&outside).unwrap();
    let out = Command::new(bin())
        .args(["volume", "add", &mnt, "V3", "--size", "2M", "--path", "V3.img"])
        .current_dir(&outside)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(outside.join("V3.img").is_file(), "the image is where --path said, relative to the CLI");
    ferry_ok(&["migrate", &mnt, "/a", "--to", "V3", "--wait"]);
    assert_eq!(placement(&m.mnt, "/a"), (vec!["V3".to_string()], 1));
    let (code, err) = ferry_err(&["volume", "add", &mnt, "V3", "--size", "2M"]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, "already exists");
    // An image file in the pool that no volume uses (an add cut short by a crash) is named.
    fs::write(tp.pool.join("volumes/V4.img"), b"").unwrap();
    let (code, err) = ferry_err(&["volume", "add", &mnt, "V4", "--size", "2M"]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, "no volume of this pool uses it");
    fs::remove_file(tp.pool.join("volumes/V4.img")).unwrap();

    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    let vl = volume_list_json(&m.mnt);
    let names: Vec<&str> = vl["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["V1", "V2", "V3"], "{vl:#}");
    assert_eq!(volume_json(&m.mnt, "V3")["path"].as_str().unwrap(), s(&outside.join("V3.img")));
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &a, "a after a remount");
    assert_bytes_eq(&fs::read(m.p("b")).unwrap(), &b, "b after a remount");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 7. Drain

/// Where a drain puts each data set: the largest first, each to the target with the most
/// free tracks left (the first listed on a tie).
fn predict_drain(sets: &[(String, u64)], targets: &[(String, u64)]) -> BTreeMap<String, String> {
    let mut left = targets.to_vec();
    let mut order = sets.to_vec();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out = BTreeMap::new();
    for (path, tracks) in order {
        let best = left
            .iter()
            .enumerate()
            .filter(|(_, (_, f))| *f >= tracks)
            .max_by(|a, b| a.1 .1.cmp(&b.1 .1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("test setup: {path} ({tracks} tracks) fits no single target"));
        left[best].1 -= tracks;
        out.insert(path, left[best].0.clone());
    }
    out
}

#[test]
fn drain_spreads_by_free_space_with_and_without_targets() {
    let tp = TestPool::new("64K", &[("V1", "16M"), ("V2", "3M"), ("V3", "4M"), ("V4", "6M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    fs::create_dir(m.p("dir")).unwrap();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (i, len) in [2_000_000usize, 1_500_000, 1_000_000, 700_000, 300_000, 40_000].into_iter().enumerate() {
        let path = if i % 2 == 0 { format!("/f{i}") } else { format!("/dir/f{i}") };
        let data = pattern(len, 800 + i as u64);
        write_whole(&m.p(&path), &data);
        files.insert(path, data);
    }
    let ls = ls_json(&m.mnt);
    let mut sets = Vec::new();
    for d in ls["data_sets"].as_array().unwrap() {
        assert_eq!(strs(&d["volumes"]), ["V1"], "test setup: every data set starts on V1: {d:#}");
        sets.push((d["path"].as_str().unwrap().to_string(), u(&d["allocated_tracks"])));
    }
    let free: Vec<(String, u64)> =
        ["V2", "V3", "V4"].iter().map(|v| (v.to_string(), u(&volume_json(&m.mnt, v)["tracks_free"]))).collect();
    let want = predict_drain(&sets, &free);
    let used: BTreeSet<&String> = want.values().collect();
    assert!(used.len() >= 2, "test setup: the drain spreads over several volumes: {want:?}");

    // Without --to: every other volume is a target.
    let out = ferry_ok(&["drain", &mnt, "V1", "--wait"]);
    assert!(out.lines().any(|l| l.contains("(drain): done")), "--wait reports the plan: {out}");
    let st = status(&m.mnt);
    let p = st["plans"].as_array().unwrap().last().cloned().unwrap();
    assert_eq!((p["kind"].as_str(), p["phase"].as_str()), (Some("drain"), Some("done")), "{p:#}");
    assert_eq!(strs(&p["sources"]), ["V1"]);
    assert_eq!(strs(&p["targets"]), ["V2", "V3", "V4"], "{p:#}");
    assert_eq!(usage(&m.mnt, "V1"), (0, 0), "V1 is empty after its drain");
    for (path, vol) in &want {
        let (vols, _) = placement(&m.mnt, path);
        assert_eq!(
            vols.as_slice(),
            std::slice::from_ref(vol),
            "{path}: drained to the volume with the most free space ({want:?})"
        );
    }
    for (path, data) in &files {
        assert_bytes_eq(&read_fresh(&m.p(path)), data, path);
    }

    // With --to: only the named volume takes the data sets.
    let on_v2: Vec<String> = want.iter().filter(|(_, v)| *v == "V2").map(|(p, _)| p.clone()).collect();
    assert!(!on_v2.is_empty(), "test setup: the first drain put something on V2");
    let v3_before = usage(&m.mnt, "V3");
    let out = ferry_ok(&["drain", &mnt, "V2", "--to", "V4", "--wait"]);
    assert!(out.lines().any(|l| l.contains("(drain): done")), "{out}");
    assert_eq!(usage(&m.mnt, "V2"), (0, 0), "V2 is empty after its drain");
    assert_eq!(usage(&m.mnt, "V3"), v3_before, "V3 was not a target");
    for path in &on_v2 {
        assert_eq!(placement(&m.mnt, path).0, vec!["V4"], "{path} went to V4");
    }
    for (path, data) in &files {
        assert_bytes_eq(&read_fresh(&m.p(path)), data, path);
    }
    let closed: BTreeSet<String> = strs(&status(&m.mnt)["closed_volumes"]).into_iter().collect();
    assert_eq!(closed, ["V1", "V2"].iter().map(|s| s.to_string()).collect());

    m.unmount();
    let m = tp.mount();
    for (path, data) in &files {
        assert_bytes_eq(&fs::read(m.p(path)).unwrap(), data, &format!("{path} after a remount"));
    }
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 8. Refused commands

#[test]
fn refused_plans_and_migrations_change_nothing() {
    let tp = TestPool::new("64K", &[("V1", "8M"), ("V2", "1M"), ("V3", "1M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    let big = pattern(3 << 20, 91);
    let small = pattern(400_000, 92);
    write_whole(&m.p("big"), &big);
    write_whole(&m.p("small"), &small);
    for p in ["/big", "/small"] {
        assert_eq!(placement(&m.mnt, p).0, vec!["V1"], "test setup");
    }
    let need: u64 = ["/big", "/small"].iter().map(|p| u(&data_set(&m.mnt, p)["allocated_tracks"])).sum();
    let free2 = u(&volume_json(&m.mnt, "V2")["tracks_free"]);
    let free3 = u(&volume_json(&m.mnt, "V3")["tracks_free"]);
    let big_tracks = u(&data_set(&m.mnt, "/big")["allocated_tracks"]);
    let before = state_of(&m.mnt);
    let big_path = s(&m.p("big")).to_string();
    let nope_path = s(&m.p("nope")).to_string();

    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["merge", &mnt, "V1", "--into", "V2"],
            vec!["merge refused".into(), format!("{need} tracks"), format!("V2 has {free2} tracks")],
        ),
        (
            vec!["drain", &mnt, "V1"],
            vec!["drain refused".into(), format!("{need} tracks"), format!("have {} tracks", free2 + free3)],
        ),
        (vec!["drain", &mnt, "V1", "--to", "V3"], vec!["drain refused".into(), format!("{need} tracks")]),
        (vec!["migrate", &mnt, &big_path, "--to", "V9"], vec!["no volume named \"V9\"".into()]),
        (vec!["migrate", &mnt, &nope_path, "--to", "V2"], vec!["no such path: /nope".into()]),
        (
            vec!["migrate", &mnt, &big_path, "--to", "V2"],
            vec!["target full".into(), format!("{big_tracks} tracks"), format!("V2 {free2} tracks")],
        ),
        (vec!["migrate", &mnt, &big_path, "--to", "V1"], vec!["nothing to move".into(), "one extent on V1".into()]),
    ];
    assert_eq!(placement(&m.mnt, "/big").1, 1, "test setup: /big is in one extent");
    for (args, words) in &cases {
        let (code, err) = ferry_err(args);
        assert_eq!(code, exit::REFUSED, "`ferryfs {}`: {err}", args.join(" "));
        assert_one_clear_line(&err, &words[0]);
        for w in words {
            assert!(err.contains(w.as_str()), "`ferryfs {}`: the error should say {w:?}: {err}", args.join(" "));
        }
        assert_eq!(state_of(&m.mnt), before, "`ferryfs {}` was refused but changed something", args.join(" "));
        assert!(
            events(&m.mnt).lines().last().is_some_and(|l| l.contains("refused command=")),
            "a refusal is an event:\n{}",
            events(&m.mnt)
        );
    }
    let st = status(&m.mnt);
    assert!(st["jobs"].as_array().unwrap().is_empty(), "{st:#}");
    assert!(st["plans"].as_array().unwrap().is_empty(), "{st:#}");
    assert!(st["closed_volumes"].as_array().unwrap().is_empty(), "{st:#}");
    assert_bytes_eq(&read_fresh(&m.p("big")), &big, "big");
    assert_bytes_eq(&read_fresh(&m.p("small")), &small, "small");
    m.unmount();
}

/// The story: plans could work against each other. A running plan's target could become
/// another plan's source (the second plan drained what the first was filling), and a volume
/// being drained could be named a target. Both are refused now (exit 3, one clear line), as
/// is a plan whose source a running job is filling; and while a plan drains a volume, no new
/// data set and no growth lands on it.
#[test]
fn plans_do_not_work_against_each_other() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    let a = pattern(1 << 20, 81);
    write_whole(&m.p("a"), &a);
    write_whole(&m.p("b"), &pattern(1 << 20, 82));
    for v in ["V2", "V3"] {
        control(&m.mnt, &format!("add {v} size=8M")).unwrap();
    }
    control(&m.mnt, "set max-jobs=1").unwrap();
    let plan = reply_plan(&control(&m.mnt, "merge V1 into V2 rate=128K").unwrap()).unwrap();
    let v1_used = usage(&m.mnt, "V1").0;

    // A running plan's target is no other plan's source; its sources are no plan's target.
    let refusals: Vec<(Vec<&str>, &str)> = vec![
        (vec!["merge", &mnt, "V2", "--into", "V3"], "volume V2 is the target of plan"),
        (vec!["drain", &mnt, "V2", "--to", "V3"], "volume V2 is the target of plan"),
        (vec!["merge", &mnt, "V3", "--into", "V1"], "volume V1 is being emptied"),
        (vec!["drain", &mnt, "V3", "--to", "V1"], "volume V1 is being emptied"),
    ];
    let before = state_of(&m.mnt);
    for (args, says) in &refusals {
        let (code, err) = ferry_err(args);
        assert_eq!(code, exit::REFUSED, "`ferryfs {}`: {err}", args.join(" "));
        assert_one_clear_line(&err, says);
        assert_eq!(state_of(&m.mnt), before, "`ferryfs {}` was refused but changed something", args.join(" "));
    }

    // New data sets and growth go around the volume being drained.
    fs::write(m.p("c"), pattern(1 << 20, 83)).unwrap();
    let mut f = OpenOptions::new().append(true).open(m.p("a")).unwrap();
    f.write_all(&pattern(512 << 10, 84)).unwrap();
    drop(f);
    assert!(!placement(&m.mnt, "/c").0.contains(&"V1".to_string()), "a new data set on a closed volume");
    assert!(usage(&m.mnt, "V1").0 <= v1_used, "growth landed on the volume being drained");

    // A running job's target is no plan's source either.
    control(&m.mnt, "add V4 size=8M").unwrap();
    let c_to = "V4";
    let job = one_job(&control(&m.mnt, &format!("migrate /c to {c_to} rate=64K")).unwrap());
    let (code, err) = ferry_err(&["drain", &mnt, c_to]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, &format!("volume {c_to} is the target of job {job}"));

    for id in [job, plan] {
        control(&m.mnt, &format!("cancel {id}")).unwrap();
    }
    wait_plan(&m.mnt, plan);
    wait_jobs(&m.mnt, &[job]);
    let mut want_a = a.clone();
    want_a.extend_from_slice(&pattern(512 << 10, 84));
    assert_bytes_eq(&read_fresh(&m.p("a")), &want_a, "a");
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn drain_of_the_only_volume_is_refused() {
    let tp = TestPool::new("64K", &[("V1", "4M")]);
    let m = tp.mount();
    let data = pattern(500_000, 95);
    write_whole(&m.p("f"), &data);
    let before = state_of(&m.mnt);
    let (code, err) = ferry_err(&["drain", s(&m.mnt), "V1"]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, "no volume is left");
    assert_eq!(state_of(&m.mnt), before, "a refused drain changed something");
    assert_eq!(placement(&m.mnt, "/f").0, vec!["V1"]);
    assert_bytes_eq(&read_fresh(&m.p("f")), &data, "f");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 9. The control file

#[test]
fn malformed_control_lines_are_refused_and_change_nothing() {
    let tp = TestPool::new("64K", &[("V1", "16M"), ("V2", "2M")]);
    // another user must be able to reach the mountpoint
    fs::set_permissions(tp.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = tp.mount();
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    let f_bytes = pattern(200_000, 97);
    write_whole(&m.p("f"), &f_bytes);
    write_whole(&m.p("big"), &pattern(3 << 20, 98));
    let control_path = m.p(".ferry/control");
    let before = state_of(&m.mnt);

    let taken = tp.pool.join("catalog.snap");
    let add_at_taken = format!("add V9 size=1M path={}", taken.display());
    for (line, errno, word) in [
        ("add V1 size=8M", libc::EEXIST, "already exists"),
        ("add V9 size=1K", libc::EINVAL, "at least one track"),
        ("add V9", libc::EINVAL, "missing size"),
        ("add V9 size=1M path=rel.img", libc::EINVAL, "not an absolute path"),
        ("add \"V 9\" size=1M", libc::EINVAL, "bad volume name"),
        (add_at_taken.as_str(), libc::EEXIST, "already exists"),
        ("frobnicate", libc::EINVAL, "unknown verb"),
        ("migrate /f", libc::EINVAL, "missing `to VOL`"),
        ("migrate /f to V2 cutover=sometimes", libc::EINVAL, "cutover must be"),
        ("migrate /f to V2 rate=fast", libc::EINVAL, "rate:"),
        ("set max-jobs=0", libc::EINVAL, "max-jobs must be"),
        ("migrate \"/f to V2", libc::EINVAL, "not closed"),
        ("migrate /nope to V2", libc::ENOENT, "no such path"),
        ("migrate /f to V9", libc::ENOENT, "no volume named"),
        ("migrate /big to V2", libc::ENOSPC, "target full"),
        ("merge V1 into V2", libc::ENOSPC, "merge refused"),
    ] {
        let reply = refused(&m.mnt, line, errno);
        assert!(reply.starts_with("error: ") && reply.contains(word), "{line:?}: reply {reply:?}");
        assert_eq!(reply.lines().count(), 1, "{line:?}: one reply line: {reply:?}");
        assert_eq!(state_of(&m.mnt), before, "{line:?} was refused but changed something");
        assert!(!tp.pool.join("volumes/V9.img").exists(), "{line:?} was refused but left an image");
        let ev = events(&m.mnt);
        assert!(ev.contains(&format!("refused command={line:?}")), "{line:?}: the refusal is an event:\n{ev}");
    }

    // After a refusal the same handle takes the next line; the replies read back in order.
    let mut f = OpenOptions::new().read(true).write(true).open(&control_path).unwrap();
    assert_errno(f.write(b"frobnicate\n"), libc::EINVAL, "frobnicate");
    f.write_all(b"set copy-rate=0\n").unwrap();
    let mut reply = String::new();
    f.read_to_string(&mut reply).unwrap();
    let lines: Vec<&str> = reply.lines().collect();
    assert_eq!(lines.len(), 2, "{reply:?}");
    assert!(lines[0].starts_with("error: unknown verb"), "{reply:?}");
    assert_eq!(lines[1], "ok copy-rate=0", "{reply:?}");
    drop(f);
    assert_eq!(state_of(&m.mnt), before);

    // A data set that a job is moving is busy.
    let id = one_job(&control(&m.mnt, "migrate /f to V2 rate=16K").unwrap());
    let reply = refused(&m.mnt, "migrate /f to V2", libc::EBUSY);
    assert!(reply.starts_with("error: ") && reply.contains("already being migrated"), "{reply:?}");
    assert_eq!(status(&m.mnt)["jobs"].as_array().unwrap().len(), 1, "the refused line queued no job");
    control(&m.mnt, &format!("cancel {id}")).unwrap();
    assert_eq!(wait_jobs(&m.mnt, &[id])[0]["phase"], "cancelled");
    assert_eq!(placement(&m.mnt, "/f").0, vec!["V1"]);
    assert_bytes_eq(&read_fresh(&m.p("f")), &f_bytes, "f");
    let before = state_of(&m.mnt);

    // From a shell.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("echo frobnicate > '{}'", control_path.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "`echo frobnicate > .ferry/control` succeeded");
    assert_eq!(state_of(&m.mnt), before);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("echo set max-jobs=3 > '{}'", control_path.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "a good line from a shell: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(&m.mnt)["max_jobs"], 3);

    // Another user may neither read the status (it names every path and job) nor send
    // commands.
    let prefix: Vec<&str> = if have("runuser") {
        vec!["runuser", "-u", "nobody", "--"]
    } else if have("setpriv") {
        vec!["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    } else {
        eprintln!("NOTE: neither runuser nor setpriv is installed; the other-user checks are skipped");
        m.unmount();
        return;
    };
    let as_nobody =
        |args: &[&OsStr]| Command::new(prefix[0]).args(&prefix[1..]).args(args).stdin(Stdio::null()).output().unwrap();
    let sh = |script: String| as_nobody(&[OsStr::new("sh"), OsStr::new("-c"), OsStr::new(&script)]);
    let out = sh(format!("cat '{}' > /dev/null", m.p(".ferry/status").display()));
    assert!(!out.status.success(), "another user read the status");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let out = sh(format!("echo set max-jobs=7 > '{}'", control_path.display()));
    assert!(!out.status.success(), "another user sent a command");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "expected a permission error: {err}");
    let out = as_nobody(&[bin().as_os_str(), OsStr::new("cancel"), m.mnt.as_os_str(), OsStr::new("1")]);
    assert!(!out.status.success(), "another user sent a command with the CLI");
    assert_one_clear_line(&String::from_utf8_lossy(&out.stderr), "only the mount's owner");
    assert_eq!(status(&m.mnt)["max_jobs"], 3, "the other user's command changed nothing");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 10. A database migrated while it takes inserts

fn sqlite3() -> Command {
    let mut c = Command::new("sqlite3");
    c.args(["-cmd", ".timeout 30000"]);
    c
}

#[track_caller]
fn sqlite_run(db: &Path, sql: &str) -> String {
    let out = sqlite3().arg("-bail").arg(db).arg(sql).stdin(Stdio::null()).output().expect("run sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn sqlite_database_migrated_while_inserting() {
    if !have("sqlite3") {
        eprintln!("SKIPPED: sqlite3 is not installed");
        return;
    }
    const PRELOAD: u64 = 2000;
    const FIRST_ID: u64 = 1_000_000;
    let tp = TestPool::new("16K", &[("V1", "96M"), ("V2", "64M")]);
    let m = tp.mount();
    fs::create_dir(m.p("db")).unwrap();
    let db = m.p("db/test.sqlite");
    let out = sqlite_run(
        &db,
        &format!(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB NOT NULL); \
             WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {PRELOAD}) \
             INSERT INTO t SELECT i, randomblob(1500) FROM c;"
        ),
    );
    assert_eq!(out.trim(), "wal");

    // One connection inserting a row per transaction; a row counts once its SELECT answers.
    // Small rows: the database grows while it is copied, and the target must hold that too.
    let mut child = sqlite3()
        .arg("-bail")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3");
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let inserter = {
        let (stop, acked) = (stop.clone(), acked.clone());
        thread::spawn(move || -> Result<(), String> {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = FIRST_ID + n + 1;
                writeln!(stdin, "INSERT INTO t(id, v) VALUES({id}, randomblob(200)); SELECT 'ack', {id};")
                    .and_then(|_| stdin.flush())
                    .map_err(|e| format!("insert {id}: {e}"))?;
                let mut line = String::new();
                out.read_line(&mut line).map_err(|e| format!("insert {id}: {e}"))?;
                if line.trim() != format!("ack|{id}") {
                    return Err(format!("insert {id}: sqlite3 answered {line:?}"));
                }
                n += 1;
                acked.store(n, Ordering::Relaxed);
                // An application with a steady pace: unpaced, on a fast disk, sqlite grows
                // the database faster than the job's 1 MB/s cap copies it, and no job can
                // converge on a data set that outgrows its copier for good.
                thread::sleep(Duration::from_millis(2));
            }
            Ok(()) // stdin closes here: sqlite3 ends
        })
    };
    wait_for("the first inserts", || acked.load(Ordering::Relaxed) >= 20);
    assert!(m.p("db/test.sqlite-wal").exists(), "test setup: the database is in WAL mode");

    let reply = control(&m.mnt, "migrate /db to V2 rate=1M").unwrap();
    let ids = reply_jobs(&reply);
    assert!(ids.len() >= 2, "the database and its WAL: {reply}");
    let main_job = status(&m.mnt)["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["path"] == "/db/test.sqlite")
        .map(|j| u(&j["id"]))
        .expect("a job for the database file");
    wait_running(&m.mnt, main_job);
    let a0 = acked.load(Ordering::Relaxed);
    wait_for("inserts during the migration", || acked.load(Ordering::Relaxed) >= a0 + 20);
    let j = job(&m.mnt, main_job);
    assert!(!is_final(j["phase"].as_str().unwrap_or("")), "test setup: inserts overlapped the job: {j:#}");
    wait_switched(&m.mnt, &ids);
    let ls = ls_json_at(&m.mnt, "/db");
    for d in ls["data_sets"].as_array().unwrap() {
        assert_eq!(strs(&d["volumes"]), ["V2"], "{d:#}");
    }
    let a1 = acked.load(Ordering::Relaxed);
    wait_for("inserts after the switch", || acked.load(Ordering::Relaxed) >= a1 + 20);
    stop.store(true, Ordering::Relaxed);
    let r = inserter.join().expect("inserter thread");
    let st = wait_child(&mut child, "sqlite3");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(r.is_ok() && st.success(), "the inserting connection failed: {r:?} ({st}): {err}");
    let n = acked.load(Ordering::Relaxed);

    let check = format!(
        "PRAGMA integrity_check; SELECT count(*) FROM t; \
         SELECT count(*), coalesce(sum(id), 0) FROM t WHERE id > {FIRST_ID};"
    );
    let sum: u64 = (FIRST_ID + 1..=FIRST_ID + n).sum();
    let want = format!("ok\n{}\n{n}|{sum}\n", PRELOAD + n);
    drop_cache(&db);
    assert_eq!(sqlite_run(&db, &check), want, "the database after the migration ({n} inserts acknowledged)");
    assert_eq!(placement(&m.mnt, "/db/test.sqlite").0, vec!["V2"]);
    m.unmount();
    let m = tp.mount();
    assert_eq!(sqlite_run(&m.p("db/test.sqlite"), &check), want, "the database after a remount");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 11. `--wait`

#[test]
fn cli_wait_follows_the_job_and_fails_when_it_is_cancelled() {
    let tp = TestPool::new("64K", &[("V1", "24M"), ("V2", "16M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    let f = pattern(3 << 20, 111);
    let g = pattern(4 << 20, 112);
    write_whole(&m.p("f"), &f);
    write_whole(&m.p("g"), &g);

    let out = ferry(["migrate", &mnt, s(&m.p("f")), "--to", "V2", "--rate", "2M", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "--wait failed ({}):\n{stdout}{stderr}", out.status);
    assert!(stderr.trim().is_empty(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let id = one_job(lines.first().copied().unwrap_or(""));
    let mine = format!("job {id} /f: ");
    let progress = lines.iter().position(|l| l.starts_with(&mine) && l.contains(" MiB at "));
    let done = lines.iter().position(|l| l.starts_with(&mine) && l.contains("switched to V2"));
    assert!(progress.is_some(), "--wait prints progress lines:\n{stdout}");
    assert!(done.is_some(), "--wait prints the switch:\n{stdout}");
    assert!(progress < done, "progress before the switch:\n{stdout}");
    assert_eq!(done, Some(lines.len() - 1), "the switch is the last line:\n{stdout}");
    assert_eq!(placement(&m.mnt, "/f"), (vec!["V2".to_string()], 1));
    assert_bytes_eq(&read_fresh(&m.p("f")), &f, "f");

    // A job cancelled by another process while --wait follows it.
    let mut child = Command::new(bin())
        .args(["migrate", &mnt, s(&m.p("g")), "--to", "V2", "--rate", "256K", "--wait"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (rx, reader) = lines_of(child.stdout.take().unwrap());
    let first = rx.recv_timeout(JOB_LIMIT).unwrap_or_else(|e| {
        let _ = child.kill();
        panic!("no reply from migrate --wait: {e}")
    });
    let id = one_job(&first);
    wait_running(&m.mnt, id);
    let out = ferry_ok(&["cancel", &mnt, &id.to_string()]);
    assert_eq!(out.trim(), format!("ok cancelling job {id}"));
    let st = wait_child(&mut child, "migrate --wait");
    reader.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!st.success(), "--wait exited 0 for a cancelled job:\n{}", rest.join("\n"));
    assert_eq!(st.code(), Some(exit::JOB_CANCELLED), "{err}");
    assert_one_clear_line(&err, "not every job switched");
    assert!(err.contains("cancelled"), "{err}");
    assert!(rest.iter().any(|l| *l == format!("job {id} /g: cancelled")), "stdout:\n{}", rest.join("\n"));
    assert_eq!(job(&m.mnt, id)["phase"], "cancelled");
    assert_eq!(placement(&m.mnt, "/g").0, vec!["V1"]);
    assert_bytes_eq(&read_fresh(&m.p("g")), &g, "g");
    m.unmount();
}
