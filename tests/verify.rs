//! Verifying before the switch (`--verify`, `verify=yes`), end to end through a real mount:
//! under a writer the job compares every track and switches; a target that differs from its
//! source (a fault point flips one byte of it after the final re-sync) fails the job, which
//! rolls back and leaves the data set on its source with its bytes; and the control line
//! takes `verify=yes` and refuses a malformed value with a clear line.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde_json::Value;

use common::jobs::*;
use common::*;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

/// A file's bytes, read from the volumes (the kernel's cached pages dropped first).
fn read_fresh(path: &Path) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: fadvise on a file descriptor this test owns.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED) on {}", path.display());
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Write a data set with one allocation (its size first), synced.
fn write_whole(path: &Path, data: &[u8]) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(data.len() as u64).unwrap();
    f.write_all_at(data, 0).unwrap();
    f.sync_all().unwrap();
}

/// Tracks a volume's data sets hold, from `volume list --json`.
fn tracks_used(target: &Path, vol: &str) -> u64 {
    u(&volume_json(target, vol)["tracks_used"])
}

/// The story: a migration that copied, re-synced and mirrored correctly but wrote a wrong
/// byte to the target (a bad disk, a bug) would switch and serve that byte from then on. With
/// `--verify` the job reads both sides in the hold and compares; under a live writer it must
/// still find them equal, switch, and say what it checked.
#[test]
fn verify_under_a_writer_switches_and_reports_what_it_checked() {
    let tp = TestPool::new("64K", &[("V1", "24M"), ("V2", "16M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    // 4 MiB in 16 KiB blocks: 64 tracks of 64 KiB.
    let lf = LoggedFile::create(&m.p("f"), 1, 16 << 10, 256);
    assert_eq!(placement(&m.mnt, "/f").0, vec!["V1"], "test setup: the data set starts on V1");
    let w = Writers::start(&lf, 2, 31);

    let out = ferry(["migrate", &mnt, "/f", "--to", "V2", "--verify", "--rate", "4M", "--wait", "--interval", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "migrate --verify --wait: {:?}\n{stdout}\n{stderr}", out.status);
    let id = reply_jobs(stdout.lines().find(|l| l.starts_with("ok jobs")).unwrap_or_else(|| panic!("{stdout}")))[0];
    assert!(stdout.contains(&format!("job {id} /f: switched to V2")), "{stdout}");
    assert!(stdout.contains("verified 64 tracks"), "the summary says what was verified:\n{stdout}");

    let j = job(&m.mnt, id);
    assert_eq!(j["phase"], "switched", "{j:#}");
    assert_eq!(j["verify"], "ok", "{j:#}");
    assert_eq!(u(&j["verified_tracks"]), 64, "every track of the data set: {j:#}");
    let verify_us = u(&j["verify_us"]);
    assert!(u(&j["stall_us"]) >= verify_us, "live: the verification is inside the stall: {j:#}");
    let ev = events(&m.mnt);
    assert!(ev.contains(&format!("job {id} verified 64 tracks (4.0 MiB) in ")), "{ev}");
    let text = ferry_ok(&["status", &mnt]);
    assert!(text.contains("verify=ok"), "`ferryfs status` shows it:\n{text}");
    let x = ferry_ok(&["metrics", &mnt]);
    let verified =
        x.lines().find(|l| l.starts_with("ferryfs_job_verified_tracks{") && l.contains(&format!("job_id=\"{id}\"")));
    assert!(verified.is_some_and(|l| l.ends_with(" 64")), "the metrics show it: {verified:?}");
    let phases = x.lines().filter(|l| l.starts_with("ferryfs_jobs{") && l.contains("phase=\"verifying\"")).count();
    assert_eq!(phases, 1, "every phase is listed, verifying too");

    assert!(w.stop() > 0, "the writer wrote during the job");
    assert_eq!(placement(&m.mnt, "/f"), (vec!["V2".to_string()], 1), "the data set is one extent on V2");
    let _ = read_fresh(&m.p("f"));
    let problems = lf.verify_at(&m.p("f"), false);
    assert!(problems.is_empty(), "the write log does not verify:\n{}", problems.join("\n"));
    m.unmount();
}

/// A target that differs from its source: the fault point `verify-corrupt-target=5` flips a
/// byte in the middle of logical track 5 on the target after the final re-sync (the last
/// track if there are fewer). The job must fail (exit 4 for `--wait`), name the track, roll
/// back its target and leave the data set on its source with its bytes, still serving reads
/// and writes. Without --verify the fault point does nothing, and the same move switches.
/// Run with small tracks (many per read) and with tracks larger than one read.
#[test]
fn a_target_that_differs_fails_the_job_and_the_source_stays() {
    for (track_size, size_bytes, bad_track) in [("64K", 2 << 20, 5), ("2M", 8 << 20, 3)] {
        a_target_that_differs(track_size, size_bytes, bad_track);
    }
}

fn a_target_that_differs(track_size: &str, size_bytes: usize, bad_track: u64) {
    let tp = TestPool::new(track_size, &[("V1", "24M"), ("V2", "16M")]);
    let m = tp.mount_env(&[("FERRYFS_PAUSE", "verify-corrupt-target=5")]);
    let mnt = s(&m.mnt).to_string();
    let data = pattern(size_bytes, 77);
    write_whole(&m.p("f"), &data);
    let before = placement(&m.mnt, "/f");
    assert_eq!(before.0, vec!["V1"], "test setup");
    let v2_before = tracks_used(&m.mnt, "V2");

    let out = ferry(["migrate", &mnt, "/f", "--to", "V2", "--verify", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(exit::JOB_FAILED), "{track_size}: {stdout}\n{stderr}");
    assert_one_clear_line(&stderr, "not every job switched");
    let id = reply_jobs(stdout.lines().find(|l| l.starts_with("ok jobs")).unwrap_or_else(|| panic!("{stdout}")))[0];
    let said = format!("job {id} /f: failed: verify: logical track {bad_track} differs");
    assert!(stdout.contains(&said), "{track_size}: {stdout}");

    let j = job(&m.mnt, id);
    assert_eq!(j["phase"], "failed", "{j:#}");
    assert_eq!(j["failed_in"], "verifying", "{j:#}");
    assert_eq!(j["verify"], "mismatch", "{j:#}");
    assert_eq!(u(&j["verified_tracks"]), bad_track + 1, "up to the first mismatch, which ends it: {j:#}");
    let ev = events(&m.mnt);
    assert!(ev.contains(&format!("job {id} fault point=verify-corrupt-target track={bad_track}")), "{ev}");
    assert!(ev.contains(&format!("job {id} verify-mismatch path=/f track={bad_track} ")), "{ev}");
    assert!(!ev.contains(&format!("job {id} switched")), "{ev}");

    // Rolled back: the data set is where it was, the target's reservation is free again.
    assert_eq!(placement(&m.mnt, "/f"), before, "the data set's extents are still on the source");
    assert_eq!(tracks_used(&m.mnt, "V2"), v2_before, "the target reservation was freed");
    assert_eq!(read_fresh(&m.p("f")), data, "the source's bytes are the original");
    // And it still serves writes.
    let f = fs::OpenOptions::new().write(true).open(m.p("f")).unwrap();
    f.write_all_at(b"still here", 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut want = data.clone();
    want[4096..4106].copy_from_slice(b"still here");
    assert_eq!(read_fresh(&m.p("f")), want, "a write after the failed job");

    // The fault point fires only before a verification: without --verify the move switches.
    let out = ferry(["migrate", &mnt, "/f", "--to", "V2", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(placement(&m.mnt, "/f").0, vec!["V2"]);
    assert_eq!(read_fresh(&m.p("f")), want, "after the switch without verify");
    m.unmount();
}

/// The control line's option: `verify=yes` on migrate and on a plan's jobs, in both cutover
/// modes; `verify=no` and no option at all mean no verification; a malformed value is refused
/// with a line that says what is allowed, and nothing is started.
#[test]
fn control_lines_take_verify_and_refuse_a_malformed_one() {
    let tp = TestPool::new("64K", &[("V1", "24M"), ("V2", "16M")]);
    let m = tp.mount();
    for (name, seed) in [("a", 1), ("b", 2), ("c", 3)] {
        write_whole(&m.p(name), &pattern(1 << 20, seed));
    }

    let e = control(&m.mnt, "migrate /a to V2 verify=maybe").unwrap_err();
    assert!(e.contains("verify must be yes or no, not \"maybe\""), "{e}");
    let e = control(&m.mnt, "migrate /a to V2 verify").unwrap_err();
    assert!(e.contains("write verify=yes"), "{e}");
    assert!(status(&m.mnt)["jobs"].as_array().unwrap().is_empty(), "a refused line starts nothing");

    let id = reply_jobs(&control(&m.mnt, "migrate /a to V2 verify=yes").unwrap())[0];
    let j = wait_switched(&m.mnt, &[id]).remove(0);
    assert_eq!((j["verify"].as_str(), u(&j["verified_tracks"])), (Some("ok"), 16), "{j:#}");

    let id = reply_jobs(&control(&m.mnt, "migrate /b to V2 cutover=close verify=yes").unwrap())[0];
    let j = wait_switched(&m.mnt, &[id]).remove(0);
    assert_eq!(j["verify"], "ok", "close mode verifies in the window: {j:#}");
    assert!(u(&j["window_us"]) >= u(&j["verify_us"]), "{j:#}");

    let id = reply_jobs(&control(&m.mnt, "migrate /c to V2 verify=no").unwrap())[0];
    let j = wait_switched(&m.mnt, &[id]).remove(0);
    assert!(j.get("verify").is_none() && j.get("verified_tracks").is_none(), "not asked, not shown: {j:#}");

    // A plan's jobs verify too.
    let reply = control(&m.mnt, "drain V2 to V1 verify=yes").unwrap();
    let plan = reply_plan(&reply).unwrap_or_else(|| panic!("{reply}"));
    let ids = reply_jobs(&reply);
    assert_eq!(ids.len(), 3, "{reply}");
    assert_eq!(wait_plan(&m.mnt, plan)["phase"], "done");
    for j in wait_switched(&m.mnt, &ids) {
        assert_eq!(j["verify"], "ok", "{j:#}");
    }
    let ev = events(&m.mnt);
    assert_eq!(ev.matches(" verified 16 tracks (1.0 MiB) in ").count(), 5, "{ev}");
    m.unmount();
}
