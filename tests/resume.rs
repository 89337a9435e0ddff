//! Resuming a migration from its checkpoint after a kill -9 of the daemon (issue 9).
//!
//! The story: a job rolled back by a crash started again from zero under a new id, so a
//! 1 TiB migration interrupted at 90 % copied the whole terabyte again. Now the copier
//! checkpoints how far the target is durable, and the write path logs a region dirty before
//! it changes a track below that mark: after the kill the job resumes near where it was,
//! under its own id, and re-copies only the regions written since their copy.
//!
//! Each test migrates a rate-capped data set, writes below the copied mark while it copies
//! (those writes must reach the target through their intent regions), kills the daemon at
//! 50-90 % of the copy, mounts again and checks: the same job id, resumed at no less than the
//! last checkpoint the events showed before the kill, switched, every byte as written, and
//! the extents on the target volume.
mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::jobs::{control, events, job, reply_jobs, wait_switched, JOB_LIMIT};
use common::{assert_bytes_eq, pattern, Mounted, TestPool};

/// Small tracks, so that a write-intent region (1024 tracks at least) is 4 MiB and the data
/// set spans several.
const TRACK_SIZE: &str = "4K";
const TRACK_BYTES: u64 = 4 << 10;
/// 24 MiB at 2 MiB/s: about 12 s of copy, a checkpoint every 2 s.
const DATA_BYTES: u64 = 24 << 20;
const RATE: &str = "2M";
/// A write-intent region: 1024 tracks.
const REGION_BYTES: u64 = 1024 * TRACK_BYTES;

/// The copy's progress in per cent, from the status.
fn copied_percent(mnt: &Path, id: u64) -> u64 {
    let j = job(mnt, id);
    let total = j["bytes_total"].as_u64().unwrap_or(0);
    (j["bytes_copied"].as_u64().unwrap_or(0) * 100).checked_div(total).unwrap_or(0)
}

/// The per cent of the last `job ID checkpoint` event, if any.
fn last_checkpoint(ev: &str, id: u64) -> Option<u64> {
    let head = format!("job {id} checkpoint ");
    ev.lines().rev().filter(|l| l.contains(&head)).find_map(|l| percent_after(l, " at "))
}

/// The number after `word` and before " %".
fn percent_after(line: &str, word: &str) -> Option<u64> {
    let rest = &line[line.find(word)? + word.len()..];
    rest.split(" %").next()?.trim().parse().ok()
}

/// The `job ID resumed at P % (from checkpoint)` event: P and the dirty regions it named.
fn resumed_event(ev: &str, id: u64) -> Option<(u64, u64)> {
    let head = format!("job {id} resumed at ");
    let line = ev.lines().find(|l| l.contains(&head) && l.contains("(from checkpoint)"))?;
    let p = percent_after(line, "resumed at ")?;
    let dirty = line.split("dirty_regions=").nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some((p, dirty))
}

/// Wait until job `id` has copied at least `pct` % (and a checkpoint was logged).
fn wait_copied(mnt: &Path, id: u64, pct: u64) -> u64 {
    let t0 = Instant::now();
    loop {
        let p = copied_percent(mnt, id);
        if p >= pct && last_checkpoint(&events(mnt), id).is_some() {
            return p;
        }
        assert!(t0.elapsed() < JOB_LIMIT, "job {id} stuck at {p} %: {}\n{}", job(mnt, id), events(mnt));
        thread::sleep(Duration::from_millis(20));
    }
}

/// Write `len` bytes of pattern `seed` at `offset` of the data set and of `model`, synced.
fn write_synced(m: &Mounted, model: &mut [u8], offset: u64, len: usize, seed: u64) {
    let f = OpenOptions::new().write(true).open(m.p("big")).unwrap();
    let data = pattern(len, seed);
    f.write_all_at(&data, offset).unwrap();
    f.sync_all().unwrap();
    model[offset as usize..offset as usize + len].copy_from_slice(&data);
}

/// Kill the daemon once the job has copied `at` %, after writing below the copied mark;
/// mount again and check that the job resumed under its own id from its checkpoint.
/// Returns the new mount and the per cent it resumed at.
fn kill_and_resume(tp: &TestPool, m: Mounted, id: u64, model: &mut [u8], at: u64, seed: u64) -> (Mounted, u64) {
    wait_copied(&m.mnt, id, at);
    let seen = last_checkpoint(&events(&m.mnt), id).unwrap();
    // Writes below the checkpoint's copy mark, in two regions the copy had passed, and the
    // kill right after them, before the next checkpoint: the last one holds the second
    // region clean (and the first too, the first time), so only their intent records bring
    // these bytes to the target.
    let mark = DATA_BYTES * seen / 100;
    for (k, off) in [REGION_BYTES / 3, mark.saturating_sub(REGION_BYTES / 2)].into_iter().enumerate() {
        write_synced(&m, model, off, 5000 + 300 * k, seed + k as u64);
    }
    let phase = job(&m.mnt, id)["phase"].as_str().unwrap_or("").to_string();
    assert_eq!(phase, "copying", "the job left the copy before the kill (checkpoint at {seen} %)");
    m.kill9();
    let m = tp.mount();
    let ev = events(&m.mnt);
    let (resumed, dirty) = resumed_event(&ev, id).unwrap_or_else(|| panic!("no `job {id} resumed at` event:\n{ev}"));
    assert!(resumed >= seen, "job {id} resumed at {resumed} %, below its checkpoint at {seen} %:\n{ev}");
    assert!(dirty >= 1, "the writes below the mark left no dirty region:\n{ev}");
    assert!(!ev.contains("resumed as job"), "the job was started again from the start:\n{ev}");
    assert_eq!(job(&m.mnt, id)["id"], id, "job {id} is not in the status after the mount");
    (m, resumed)
}

#[test]
fn a_killed_migration_resumes_from_its_checkpoint_under_its_own_id() {
    let tp = TestPool::new(TRACK_SIZE, &[("V1", "40M"), ("V2", "40M")]);
    let m = tp.mount();
    let mut model = pattern(DATA_BYTES as usize, 1);
    fs::write(m.p("big"), &model).unwrap();
    OpenOptions::new().write(true).open(m.p("big")).unwrap().sync_all().unwrap();
    let reply = control(&m.mnt, &format!("migrate /big to V2 rate={RATE}")).unwrap();
    let id = reply_jobs(&reply)[0];

    // The first kill, at half way; then a second one, of the resumed job, further on.
    let (m, first) = kill_and_resume(&tp, m, id, &mut model, 35, 100);
    let (m, second) = kill_and_resume(&tp, m, id, &mut model, first + 12, 200);
    assert!(second >= first, "the second resume ({second} %) went back behind the first ({first} %)");

    // The resumed job runs to its switch, under writes below the mark and past it.
    write_synced(&m, &mut model, 3 * TRACK_BYTES + 17, 20_000, 300);
    let done = wait_switched(&m.mnt, &[id]);
    assert_eq!(done[0]["id"], id);
    let got = fs::read(m.p("big")).unwrap();
    assert_bytes_eq(&got, &model, "the data set after two kills and resumes");
    let (vols, _) = common::jobs::placement(&m.mnt, "/big");
    assert_eq!(vols, ["V2"], "the data set is not on the target");
    m.unmount();

    // And after a clean mount, from the target.
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("big")).unwrap(), &model, "the data set after a remount");
    m.unmount();
}

/// A job stopped by a clean unmount keeps its checkpoint too: the next mount resumes it.
#[test]
fn a_job_stopped_by_an_unmount_resumes_from_its_checkpoint() {
    let tp = TestPool::new(TRACK_SIZE, &[("V1", "40M"), ("V2", "40M")]);
    let m = tp.mount();
    let model = pattern(DATA_BYTES as usize, 9);
    fs::write(m.p("big"), &model).unwrap();
    let reply = control(&m.mnt, &format!("migrate /big to V2 rate={RATE}")).unwrap();
    let id = reply_jobs(&reply)[0];
    wait_copied(&m.mnt, id, 40);
    let seen = last_checkpoint(&events(&m.mnt), id).unwrap();
    m.unmount();
    let m = tp.mount();
    let ev = events(&m.mnt);
    let (resumed, _) = resumed_event(&ev, id).unwrap_or_else(|| panic!("no `job {id} resumed at` event:\n{ev}"));
    assert!(resumed >= seen, "resumed at {resumed} %, below the checkpoint at {seen} %:\n{ev}");
    wait_switched(&m.mnt, &[id]);
    assert_bytes_eq(&fs::read(m.p("big")).unwrap(), &model, "the data set after the resume");
    m.unmount();
}
